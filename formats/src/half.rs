//! IEEE 754 half precision (numpy's `float16`, HDF5's and zarr's 16-bit floats): the bits of a
//! half as an `f64`, for reading elements as numbers, and an `f64` as the bits of the nearest
//! half, for writing values (zarr fill values) in that width.

/// The value of the half-precision number with bits `h`. Exact for every finite half (each is
/// an 11-bit integer times a power of two); every NaN becomes [`f64::NAN`] (sign and payload
/// are not kept).
pub(crate) fn to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    match exp {
        0 => sign * frac * 2f64.powi(-24),
        31 if frac == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        e => sign * (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// The bits of the half nearest to `v`: magnitudes from 65520 up become infinity, those below
/// half the smallest subnormal become (signed) zero, NaN becomes `0x7e00`. A value exactly
/// halfway between two halves rounds away from zero.
pub(crate) fn from_f64(v: f64) -> u16 {
    if v.is_nan() {
        return 0x7e00;
    }
    let sign: u16 = if v.is_sign_negative() { 0x8000 } else { 0 };
    let a = v.abs();
    if a >= 65520.0 {
        return sign | 0x7c00;
    }
    if a < 2f64.powi(-24) / 2.0 {
        return sign;
    }
    if a < 2f64.powi(-14) {
        return sign | (a / 2f64.powi(-24)).round() as u16;
    }
    let e = a.log2().floor() as i32;
    let m = ((a / 2f64.powi(e) - 1.0) * 1024.0).round() as u32;
    let (e, m) = if m == 1024 { (e + 1, 0) } else { (e, m) };
    sign | (((e + 15) as u16) << 10) | m as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Halves and their values, from IEEE 754's binary16 layout (1 sign, 5 exponent, 10
    /// fraction bits; bias 15).
    const KNOWN: &[(u16, f64)] = &[
        (0x0000, 0.0),
        (0x0001, 5.960_464_477_539_063e-8), // smallest subnormal, 2^-24
        (0x0200, 3.051_757_812_5e-5),       // 2^-15
        (0x03ff, 6.097_555_160_522_461e-5), // largest subnormal, 1023 * 2^-24
        (0x0400, 6.103_515_625e-5),         // smallest normal, 2^-14
        (0x3555, 0.333_251_953_125),
        (0x3800, 0.5),
        (0x3c00, 1.0),
        (0x3c01, 1.000_976_562_5), // 1 + 2^-10
        (0x4248, 3.140_625),
        (0x7bff, 65504.0), // largest finite
        (0x8001, -5.960_464_477_539_063e-8),
        (0xbc00, -1.0),
        (0xc000, -2.0),
        (0xfbff, -65504.0),
    ];

    #[test]
    fn reads_known_bit_patterns() {
        for &(h, v) in KNOWN {
            assert_eq!(to_f64(h).to_bits(), v.to_bits(), "{h:#06x}");
        }
        assert_eq!(to_f64(0x8000).to_bits(), (-0.0f64).to_bits());
        assert_eq!(to_f64(0x7c00), f64::INFINITY);
        assert_eq!(to_f64(0xfc00), f64::NEG_INFINITY);
        for nan in [0x7c01, 0x7e00, 0x7fff, 0xfc01, 0xfe00, 0xffff] {
            assert_eq!(to_f64(nan).to_bits(), f64::NAN.to_bits(), "{nan:#06x}");
        }
    }

    #[test]
    fn writes_known_bit_patterns() {
        for &(h, v) in KNOWN {
            assert_eq!(from_f64(v), h, "{v}");
        }
        assert_eq!(from_f64(-0.0), 0x8000);
        assert_eq!(from_f64(f64::INFINITY), 0x7c00);
        assert_eq!(from_f64(f64::NEG_INFINITY), 0xfc00);
        assert_eq!(from_f64(f64::NAN), 0x7e00);
        assert_eq!(from_f64(65519.0), 0x7bff);
        assert_eq!(from_f64(65520.0), 0x7c00);
        assert_eq!(from_f64(-1e6), 0xfc00);
        assert_eq!(from_f64(1e-8), 0x0000);
        assert_eq!(from_f64(-1e-8), 0x8000);
        assert_eq!(from_f64(1.0 / 3.0), 0x3555);
    }

    #[test]
    fn every_half_but_nan_round_trips() {
        for h in 0..=u16::MAX {
            let v = to_f64(h);
            if v.is_nan() {
                assert_eq!(h & 0x7c00, 0x7c00, "{h:#06x}");
                assert_ne!(h & 0x03ff, 0, "{h:#06x}");
            } else {
                assert_eq!(from_f64(v), h, "{h:#06x}");
            }
        }
    }
}
