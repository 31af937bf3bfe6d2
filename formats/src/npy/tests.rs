//! Unit tests over pickles built here in numpy 1.x and 2.x style, and two fixtures written by
//! real numpy. `common/tests/npy_numpy.rs` cross-checks against numpy itself.

use std::collections::HashMap;
use std::io::Cursor;

use super::header::{Descr, PyLit, write_header};
use super::*;
use crate::pickle::{Decoder, OpReader, Step, Value, emit, op};

/// `np.save` of three dicts (float, str, np.float32, None / nested dict) by numpy 2.4.
const NUMPY2_FIXTURE: &str = "934e554d5059010076007b276465736372273a20277c4f272c2027666f727472616e5f6f72646572273a2046616c73652c20277368617065273a2028332c292c207d202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020200a80049538010000000000008c166e756d70792e5f636f72652e6d756c74696172726179948c0c5f7265636f6e7374727563749493948c056e756d7079948c076e6461727261799493944b0085944301629487945294284b014b03859468038c0564747970659493948c024f3894898887945294284b038c017c944e4e4e4affffffff4affffffff4b3f749462895d94287d94288c017894473ff80000000000008c0173948c0161948c01669468008c067363616c6172949394680c8c02663494898887945294284b038c013c944e4e4e4affffffff4affffffff4b0074946243040000204094869452948c016e944e757d942868144b0268158c01629468176819681c4304000080bf948694529468227d948c016b948873757d942868144afdffffff68158c01639468176819681c430400000000948694529468224e75657494622e";
/// The same array saved by numpy 1.26.4.
const NUMPY1_FIXTURE: &str = "934e554d5059010076007b276465736372273a20277c4f272c2027666f727472616e5f6f72646572273a2046616c73652c20277368617065273a2028332c292c207d202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020200a8003636e756d70792e636f72652e6d756c746961727261790a5f7265636f6e7374727563740a7100636e756d70790a6e6461727261790a71014b008571024301627103877104527105284b014b03857106636e756d70790a64747970650a710758020000004f387108898887710952710a284b0358010000007c710b4e4e4e4affffffff4affffffff4b3f74710c62895d710d287d710e28580100000078710f473ff8000000000000580100000073711058010000006171115801000000667112636e756d70792e636f72652e6d756c746961727261790a7363616c61720a711368075802000000663471148988877115527116284b0358010000003c71174e4e4e4affffffff4affffffff4b0074711862430400002040711986711a52711b58010000006e711c4e757d711d28680f4b026810580100000062711e6812681368164304000080bf711f867120527121681c7d712258010000006b71238873757d712428680f4afdffffff681058010000006371256812681368164304000000007126867127527128681c4e7565747129622e";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A value to pickle.
#[derive(Clone, Debug)]
enum T {
    I(i64),
    F(f64),
    S(String),
    N,
    B(bool),
    /// `np.float32(x)`: a numpy scalar, whose pickle reuses prologue memo entries.
    F32(f32),
    D(Vec<(String, T)>),
    L(Vec<T>),
    /// The very object that element `j` of the same input is (pickled as a memo GET).
    Again(usize),
    /// Opcodes as given.
    Raw(Vec<u8>),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Style {
    /// numpy 1.x: protocol 3, `GLOBAL`, explicit `BINPUT`.
    Np1,
    /// numpy 2.x: protocol 4, a `FRAME`, `STACK_GLOBAL`, `MEMOIZE`.
    Np2,
}

/// Writes pickles the way numpy's `ndarray.__reduce__` plus `pickle` would.
struct Pickler {
    style: Style,
    out: Vec<u8>,
    next: u32,
    memo: HashMap<String, u32>,
    elements: Vec<u32>,
}

impl Pickler {
    fn memoize(&mut self) -> u32 {
        let i = self.next;
        self.next += 1;
        match self.style {
            Style::Np1 => emit::put(&mut self.out, i),
            Style::Np2 => self.out.push(op::MEMOIZE),
        }
        i
    }

    fn reuse(&mut self, key: &str) -> bool {
        match self.memo.get(key) {
            Some(&i) => {
                emit::get(&mut self.out, i);
                true
            }
            None => false,
        }
    }

    fn str(&mut self, s: &str) {
        let key = format!("s:{s}");
        if self.reuse(&key) {
            return;
        }
        match self.style {
            Style::Np1 => emit::unicode(&mut self.out, s),
            Style::Np2 => {
                self.out
                    .extend_from_slice(&[op::SHORT_BINUNICODE, s.len() as u8]);
                self.out.extend_from_slice(s.as_bytes());
            }
        }
        let i = self.memoize();
        self.memo.insert(key, i);
    }

    fn global(&mut self, module: &str, name: &str) {
        let key = format!("g:{module}.{name}");
        if self.reuse(&key) {
            return;
        }
        match self.style {
            Style::Np1 => emit::global(&mut self.out, module, name),
            Style::Np2 => {
                self.str(module);
                self.str(name);
                self.out.push(op::STACK_GLOBAL);
            }
        }
        let i = self.memoize();
        self.memo.insert(key, i);
    }

    fn core(&self) -> &'static str {
        match self.style {
            Style::Np1 => "numpy.core.multiarray",
            Style::Np2 => "numpy._core.multiarray",
        }
    }

    fn dtype(&mut self, name: &str, order: &str, flags: i64) {
        let key = format!("d:{name}");
        if self.reuse(&key) {
            return;
        }
        self.global("numpy", "dtype");
        self.str(name);
        self.out
            .extend_from_slice(&[op::NEWFALSE, op::NEWTRUE, op::TUPLE3]);
        self.memoize();
        self.out.push(op::REDUCE);
        let i = self.memoize();
        self.memo.insert(key, i);
        self.out.push(op::MARK);
        emit::int(&mut self.out, 3);
        self.str(order);
        self.out.extend_from_slice(&[op::NONE, op::NONE, op::NONE]);
        emit::int(&mut self.out, -1);
        emit::int(&mut self.out, -1);
        emit::int(&mut self.out, flags);
        self.out.push(op::TUPLE);
        self.memoize();
        self.out.push(op::BUILD);
    }

    fn value(&mut self, t: &T) {
        match t {
            T::I(n) => emit::int(&mut self.out, *n),
            T::F(f) => {
                self.out.push(op::BINFLOAT);
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            T::S(s) => self.str(s),
            T::N => self.out.push(op::NONE),
            T::B(b) => self.out.push(if *b { op::NEWTRUE } else { op::NEWFALSE }),
            T::F32(x) => {
                self.global(self.core(), "scalar");
                self.dtype("f4", "<", 0);
                emit::bytes(&mut self.out, &x.to_le_bytes());
                self.memoize();
                self.out.push(op::TUPLE2);
                self.memoize();
                self.out.push(op::REDUCE);
                self.memoize();
            }
            T::D(items) => {
                self.out.push(op::EMPTY_DICT);
                self.memoize();
                if items.len() > 1 {
                    self.out.push(op::MARK);
                }
                for (k, v) in items {
                    self.str(k);
                    self.value(v);
                }
                if items.len() > 1 {
                    self.out.push(op::SETITEMS);
                } else if items.len() == 1 {
                    self.out.push(op::SETITEM);
                }
            }
            T::L(items) => {
                self.out.push(op::EMPTY_LIST);
                self.memoize();
                self.appends(items, 1000, |p, t| p.value(t));
            }
            T::Again(j) => emit::get(&mut self.out, self.elements[*j]),
            T::Raw(b) => self.out.extend_from_slice(b),
        }
    }

    /// pickle's `_batch_appends`: MARK..APPENDS per `batch` items, a lone APPEND for one.
    fn appends<X>(&mut self, items: &[X], batch: usize, mut f: impl FnMut(&mut Self, &X)) {
        for chunk in items.chunks(batch) {
            if chunk.len() == 1 {
                f(self, &chunk[0]);
                self.out.push(op::APPEND);
            } else {
                self.out.push(op::MARK);
                for it in chunk {
                    f(self, it);
                }
                self.out.push(op::APPENDS);
            }
        }
    }

    /// A whole `.npy` file holding `elements` as a 1-D object array.
    fn npy(style: Style, elements: &[T], batch: usize) -> Vec<u8> {
        let mut p = Pickler {
            style,
            out: Vec::new(),
            next: 0,
            memo: HashMap::new(),
            elements: Vec::new(),
        };
        match style {
            Style::Np1 => p.out.extend_from_slice(&[op::PROTO, 3]),
            Style::Np2 => {
                p.out.extend_from_slice(&[op::PROTO, 4, op::FRAME]);
                p.out.extend_from_slice(&[0; 8]);
            }
        }
        p.global(p.core(), "_reconstruct");
        p.global("numpy", "ndarray");
        emit::int(&mut p.out, 0);
        p.out.push(op::TUPLE1);
        p.memoize();
        emit::bytes(&mut p.out, b"b");
        p.memoize();
        p.out.push(op::TUPLE3);
        p.memoize();
        p.out.push(op::REDUCE);
        p.memoize();
        p.out.push(op::MARK);
        emit::int(&mut p.out, 1);
        emit::int(&mut p.out, elements.len() as i64);
        p.out.push(op::TUPLE1);
        p.memoize();
        p.dtype("O8", "|", 63);
        p.out.extend_from_slice(&[op::NEWFALSE, op::EMPTY_LIST]);
        p.memoize();
        p.appends(elements, batch, |p, t| {
            let before = p.next;
            p.value(t);
            // The memo index an element's own object got (its first memoize), for `Again`.
            let own = match t {
                T::D(_) | T::L(_) => before,
                T::Again(j) => p.elements[*j],
                _ => u32::MAX,
            };
            p.elements.push(own);
        });
        p.out.push(op::TUPLE);
        p.memoize();
        p.out.extend_from_slice(&[op::BUILD, op::STOP]);
        if style == Style::Np2 {
            // Frame everything after the FRAME opcode but the final STOP, as pickle would.
            let len = (p.out.len() - 11 - 1) as u64;
            p.out[3..11].copy_from_slice(&len.to_le_bytes());
        }
        let mut file = write_header(&Descr::Object, &[elements.len() as u64]).unwrap();
        file.extend_from_slice(&p.out);
        file
    }
}

fn render(v: &Value, out: &mut String) {
    match v {
        Value::None => out.push_str("None"),
        Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
        Value::Int(n) => out.push_str(&n.to_string()),
        Value::Float(f) => out.push_str(&format!("{:?}", f.to_bits())),
        Value::Str(s) => out.push_str(&format!("{:?}", s)),
        Value::Bytes(b) => out.push_str(&format!("b{:?}", b)),
        Value::Tuple(t) => {
            out.push('(');
            for it in &t.items {
                render(it, out);
                out.push(',');
            }
            out.push(')');
        }
        Value::List(l) => {
            out.push('[');
            for it in &l.borrow().items {
                render(it, out);
                out.push(',');
            }
            out.push(']');
        }
        Value::Dict(m) => {
            out.push('{');
            for (k, v) in &m.borrow().items {
                render(k, out);
                out.push(':');
                render(v, out);
                out.push(',');
            }
            out.push('}');
        }
        Value::Global(g) => out.push_str(&format!("{}.{}", g.0, g.1)),
        Value::Object(o) => {
            let o = o.borrow();
            render(&o.callable, out);
            render(&o.args, out);
            if let Some(s) = &o.state {
                out.push('@');
                render(s, out);
            }
        }
        other => out.push_str(&format!("<{}>", other.type_name())),
    }
}

/// Every element of an object-array npy, rendered, by evaluating its whole pickle.
fn elements(file: &[u8]) -> Vec<String> {
    let h = header::read_header(&mut &file[..]).unwrap();
    let mut rd = OpReader::new(&file[h.data_offset as usize..]);
    let mut dec = Decoder::default();
    let mut out = Vec::new();
    while let Some(op) = rd.next_op().unwrap() {
        match dec.apply(&op, &mut rd).unwrap() {
            Step::Elements => {
                for e in dec.take_elements() {
                    let mut s = String::new();
                    render(&e, &mut s);
                    out.push(s);
                }
            }
            Step::Stop(_) => {
                assert!(rd.at_eof().unwrap());
                return out;
            }
            _ => {}
        }
    }
    panic!("no STOP");
}

fn merge_bytes(files: &[Vec<u8>], limit: u64) -> Result<(Vec<u8>, MergeSummary), FormatError> {
    let counts: Vec<u64> = files
        .iter()
        .map(|f| header::read_header(&mut &f[..]).unwrap().shape[0])
        .collect();
    let mut out = Vec::new();
    let s = merge(
        &counts,
        limit,
        |i| Ok(Cursor::new(files[i].clone())),
        &mut out,
    )?;
    assert_eq!(s.bytes_written, out.len() as u64);
    Ok((out, s))
}

/// Merges, then checks the result element by element against the inputs' own elements, and
/// that `inspect` accepts it.
fn check_merge(files: &[Vec<u8>], limit: u64) -> Vec<u8> {
    let (out, summary) = merge_bytes(files, limit).unwrap();
    let mut want: Vec<String> = files.iter().flat_map(|f| elements(f)).collect();
    want.truncate(limit.min(want.len() as u64) as usize);
    let got = elements(&out);
    assert_eq!(got.len(), want.len(), "limit {limit}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "element {i}, limit {limit}");
    }
    assert_eq!(summary.samples, want.len() as u64);
    assert_eq!(summary.used_per_input.iter().sum::<u64>(), summary.samples);
    let info = inspect(&out[..], out.len() as u64).unwrap();
    assert_eq!(info.count, want.len() as u64);
    out
}

fn sample(i: usize) -> T {
    let mut d = vec![
        ("id".to_string(), T::I(i as i64)),
        ("score".to_string(), T::F(i as f64 / 7.0)),
        ("name".to_string(), T::S(format!("obj{}", i % 5))),
        ("ok".to_string(), T::B(i.is_multiple_of(2))),
        ("f".to_string(), T::F32(i as f32 * 0.5)),
    ];
    d.push((
        "extra".to_string(),
        if i.is_multiple_of(3) {
            T::N
        } else {
            T::D(vec![
                ("depth".into(), T::I(-(i as i64))),
                ("tags".into(), T::L(vec![T::S("t".into()), T::I(1)])),
            ])
        },
    ));
    T::D(d)
}

fn samples(range: std::ops::Range<usize>) -> Vec<T> {
    range.map(sample).collect()
}

#[test]
fn real_numpy_fixtures_inspect_and_merge() {
    for hex in [NUMPY1_FIXTURE, NUMPY2_FIXTURE] {
        let f = unhex(hex);
        let info = inspect(&f[..], f.len() as u64).unwrap();
        assert_eq!(info.count, 3);
        assert_eq!(info.schema, "npy object dict keys [f, n, s, x]");
        assert_eq!(info.kind, ArrayKind::Object);
        for limit in 0..=7 {
            check_merge(&[f.clone(), f.clone()], limit);
        }
    }
    // The module `_reconstruct` comes from follows input 0.
    let (out, _) = merge_bytes(&[unhex(NUMPY1_FIXTURE), unhex(NUMPY2_FIXTURE)], 6).unwrap();
    assert!(out.windows(21).any(|w| w == b"numpy.core.multiarray"));
    let (out, _) = merge_bytes(&[unhex(NUMPY2_FIXTURE), unhex(NUMPY1_FIXTURE)], 6).unwrap();
    let want = b"numpy._core.multiarray\n_reconstruct";
    assert!(out.windows(want.len()).any(|w| w == want));
}

#[test]
fn truncates_at_every_position_of_multi_batch_inputs() {
    for style in [Style::Np1, Style::Np2] {
        // Batches of 4, so a 7-element input is MARK..APPENDS (4) then MARK..APPENDS (3), and a
        // 5-element one ends with a lone APPEND.
        let a = Pickler::npy(style, &samples(0..7), 4);
        let b = Pickler::npy(style, &samples(7..12), 4);
        let c = Pickler::npy(style, &samples(12..13), 4);
        let files = [a, b, c];
        for limit in 0..=14 {
            check_merge(&files, limit);
        }
    }
}

#[test]
fn big_inputs_with_real_batch_size() {
    for style in [Style::Np1, Style::Np2] {
        let a = Pickler::npy(style, &samples(0..2500), 1000);
        let b = Pickler::npy(style, &samples(2500..3001), 1000);
        let files = [a, b];
        for limit in [
            0, 1, 999, 1000, 1001, 2000, 2499, 2500, 2501, 3500, 3501, 5000,
        ] {
            check_merge(&files, limit);
        }
    }
}

#[test]
fn one_item_and_empty_inputs() {
    for style in [Style::Np1, Style::Np2] {
        let one = Pickler::npy(style, &samples(0..1), 1000);
        let empty = Pickler::npy(style, &[], 1000);
        check_merge(std::slice::from_ref(&one), 1);
        check_merge(
            &[empty.clone(), one.clone(), empty.clone(), one.clone()],
            10,
        );
        check_merge(&[empty.clone(), empty.clone()], 10);
        check_merge(&[one.clone(), one.clone(), one.clone()], 2);
        let (_, s) = merge_bytes(&[one.clone(), one.clone(), one], 2).unwrap();
        assert_eq!(s.used_per_input, [1, 1, 0]);
    }
}

#[test]
fn shared_objects_survive_renumbering_and_cuts() {
    for style in [Style::Np1, Style::Np2] {
        let mut items = samples(0..6);
        items.push(T::Again(2));
        items.push(T::Again(6));
        items.push(sample(9));
        items.push(T::Again(0));
        let a = Pickler::npy(style, &items, 3);
        for limit in 0..=(2 * items.len() as u64) {
            let out = check_merge(&[a.clone(), a.clone()], limit);
            // Shared elements are one object in the merged file too.
            let h = header::read_header(&mut &out[..]).unwrap();
            let mut rd = OpReader::new(&out[h.data_offset as usize..]);
            let mut dec = Decoder::default();
            let mut els = Vec::new();
            while let Some(op) = rd.next_op().unwrap() {
                match dec.apply(&op, &mut rd).unwrap() {
                    Step::Elements => els.extend(dec.take_elements()),
                    Step::Stop(_) => break,
                    _ => {}
                }
            }
            let same = |i: usize, j: usize| match (&els[i], &els[j]) {
                (Value::Dict(x), Value::Dict(y)) => std::rc::Rc::ptr_eq(x, y),
                _ => false,
            };
            if els.len() > 7 {
                assert!(same(2, 6) && same(2, 7));
            }
            if els.len() > 10 + 6 {
                assert!(same(10 + 2, 10 + 6) && !same(2, 12));
            }
        }
    }
}

#[test]
fn output_memo_is_sequential_and_memoize_from_protocol_4() {
    // Output memo entries are written 0, 1, 2, ... in order: as `MEMOIZE` when the output
    // declares protocol 4 (input 0 is numpy 2 style), else as explicit `BINPUT`s.
    for (style, proto) in [(Style::Np1, 3), (Style::Np2, 4)] {
        let a = Pickler::npy(style, &samples(0..300), 1000);
        let b = Pickler::npy(Style::Np1, &samples(0..300), 1000);
        let (out, _) = merge_bytes(&[a, b], 600).unwrap();
        let h = header::read_header(&mut &out[..]).unwrap();
        let mut rd = OpReader::new(&out[h.data_offset as usize..]);
        let mut writes = 0;
        let mut longest_read = 0;
        while let Some(o) = rd.next_op().unwrap() {
            match o.code {
                op::PROTO => assert_eq!(o.int, proto),
                op::FRAME => panic!("FRAME in the output"),
                op::MEMOIZE => {
                    assert_eq!(proto, 4, "MEMOIZE under protocol {proto}");
                    writes += 1;
                }
                op::BINPUT | op::LONG_BINPUT => {
                    assert_eq!(proto, 3, "explicit memo index under protocol {proto}");
                    assert_eq!(o.int, writes);
                    writes += 1;
                }
                op::BINGET | op::LONG_BINGET => {
                    assert!(
                        o.int < writes,
                        "read of entry {} before it is written",
                        o.int
                    );
                    longest_read = longest_read.max(o.int);
                }
                _ => {}
            }
        }
        assert!(longest_read > 256, "LONG_BINGET exercised");
    }
}

/// Serves a file a few bytes per `read`, so a `BufReader` on it never holds more than a few
/// ops: every op boundary lands at a buffer's end somewhere.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    step: usize,
}

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step = self.step % 11 + 1;
        let n = self.step.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn fast_and_general_paths_agree() {
    // Ops the fast path leaves to the general one: text-line arguments, signed lengths,
    // POP, a FRAME inside an element, a payload larger than the read buffer, reads of the
    // prologue's memo entries (np.float32 reuses its dtype global).
    let big = {
        let mut b = vec![op::BINBYTES];
        b.extend_from_slice(&(200_000u32).to_le_bytes());
        b.extend((0..200_000u32).map(|i| i as u8));
        b
    };
    // Every element has the same keys; elements 1, 7, 8, 30 encode them the unusual way.
    let element = |i: usize| {
        let odd = [1, 7, 8, 30].contains(&i);
        let pick = |raw: Vec<u8>, plain: T| if odd { T::Raw(raw) } else { plain };
        T::D(vec![
            ("line".into(), pick(b"I42\n".to_vec(), T::I(i as i64))),
            (
                "signed".into(),
                pick(b"T\x02\x00\x00\x00ab".to_vec(), T::S("ab".into())),
            ),
            (
                "pop".into(),
                pick(vec![op::NONE, op::POP, op::NEWTRUE], T::B(false)),
            ),
            (
                "frame".into(),
                pick([&[op::FRAME][..], &[0; 8], &[op::NONE]].concat(), T::N),
            ),
            (
                "big".into(),
                if i == 1 { T::Raw(big.clone()) } else { T::N },
            ),
            ("f".into(), T::F32(i as f32)),
        ])
    };
    for style in [Style::Np1, Style::Np2] {
        let mut items: Vec<T> = (0..40).map(element).collect();
        items[33] = T::Again(7);
        let files = [
            Pickler::npy(style, &items, 16),
            Pickler::npy(style, &items[..13], 4),
        ];
        let counts = [40, 13];
        for limit in [53, 40, 45, 48, 49, 20, 8, 2] {
            let trickled = {
                let mut out = Vec::new();
                let s = merge(
                    &counts,
                    limit,
                    |i| {
                        Ok(Trickle {
                            data: files[i].clone(),
                            pos: 0,
                            step: 0,
                        })
                    },
                    &mut out,
                )
                .unwrap();
                assert_eq!(s.bytes_written, out.len() as u64);
                out
            };
            // Read through a 64 KiB buffer, nearly all ops take the fast path.
            let whole = check_merge(&files, limit);
            assert_eq!(trickled, whole, "limit {limit}");
        }
    }
}

#[test]
fn merge_is_deterministic() {
    let files = [
        Pickler::npy(Style::Np2, &samples(0..40), 16),
        Pickler::npy(Style::Np1, &samples(0..9), 4),
    ];
    let one = merge_bytes(&files, 45).unwrap().0;
    let two = merge_bytes(&files, 45).unwrap().0;
    assert_eq!(one, two);
}

fn numeric_npy(descr: &str, shape: &[u64], fill: u8) -> Vec<u8> {
    let d = header::parse_descr_for_tests(descr);
    let Descr::Numeric { itemsize, .. } = d else {
        panic!()
    };
    let mut f = write_header(&d, shape).unwrap();
    let n: u64 = shape.iter().product::<u64>() * itemsize;
    f.extend((0..n).map(|i| fill.wrapping_add(i as u8)));
    f
}

#[test]
fn numeric_merge_concatenates_and_cuts() {
    let a = numeric_npy("<f4", &[3, 2], 0);
    let b = numeric_npy("<f4", &[4, 2], 100);
    for limit in 0..=8 {
        let (out, s) = merge_bytes(&[a.clone(), b.clone()], limit).unwrap();
        let total = limit.min(7);
        let mut want = write_header(&header::parse_descr_for_tests("<f4"), &[total, 2]).unwrap();
        let data: Vec<u8> = a[128..].iter().chain(&b[128..]).copied().collect();
        want.extend_from_slice(&data[..(total * 8) as usize]);
        assert_eq!(out, want);
        assert_eq!(s.samples, total);
        let info = inspect(&out[..], out.len() as u64).unwrap();
        assert_eq!(info.schema, "npy <f4 (*, 2)");
        assert_eq!(info.count, total);
    }
}

#[test]
fn numeric_inputs_must_agree() {
    let a = numeric_npy("<f4", &[3, 2], 0);
    let e = merge_bytes(&[a.clone(), numeric_npy("<f8", &[3, 2], 0)], 10).unwrap_err();
    assert!(matches!(e, FormatError::Mismatch { input: 1, .. }), "{e}");
    let e = merge_bytes(&[a.clone(), numeric_npy("<f4", &[3, 3], 0)], 10).unwrap_err();
    assert!(matches!(e, FormatError::Mismatch { input: 1, .. }), "{e}");
    let obj = Pickler::npy(Style::Np2, &samples(0..2), 1000);
    let e = merge_bytes(&[a.clone(), obj.clone()], 10).unwrap_err();
    assert!(matches!(e, FormatError::Mismatch { input: 1, .. }), "{e}");
    let e = merge_bytes(&[obj, a.clone()], 10).unwrap_err();
    assert!(matches!(e, FormatError::Mismatch { input: 1, .. }), "{e}");
    // A truncated input is caught while copying it.
    let mut short = a.clone();
    short.pop();
    let e = merge_bytes(&[a.clone(), short], 10).unwrap_err();
    assert!(matches!(e.root(), FormatError::Truncated { .. }), "{e}");
    assert_eq!(e.input_index(), Some(1));
    // A committed count that disagrees with the header.
    let mut out = Vec::new();
    let e = merge(&[3, 4], 10, |_| Ok(Cursor::new(a.clone())), &mut out).unwrap_err();
    assert!(
        matches!(
            e.root(),
            FormatError::CountMismatch {
                expected: 4,
                actual: 3,
                ..
            }
        ),
        "{e}"
    );
    let e = merge(&[], 10, |_| Ok(Cursor::new(a.clone())), &mut out).unwrap_err();
    assert!(matches!(e, FormatError::NoInputs));
}

#[test]
fn inspect_finds_truncation_and_dtype_changes() {
    let a = numeric_npy("<f4", &[5, 3, 4], 0);
    let info = inspect(&a[..], a.len() as u64).unwrap();
    assert_eq!(info.schema, "npy <f4 (*, 3, 4)");
    assert_eq!(
        info.kind,
        ArrayKind::Numeric {
            descr: "<f4".into(),
            tail_shape: vec![3, 4]
        }
    );
    assert_eq!(info.data_offset, 128);
    let b = numeric_npy("<f8", &[5, 3, 4], 0);
    assert_ne!(inspect(&b[..], b.len() as u64).unwrap().schema, info.schema);
    let cut = a.len() as u64 - 1;
    match inspect(&a[..cut as usize], cut).unwrap_err() {
        FormatError::Truncated {
            expected, actual, ..
        } => {
            assert_eq!((expected, actual), (a.len() as u64, cut));
        }
        e => panic!("{e}"),
    }
    let mut long = a.clone();
    long.push(0);
    assert!(matches!(
        inspect(&long[..], long.len() as u64),
        Err(FormatError::TrailingData { .. })
    ));
    let one_d = numeric_npy("|u1", &[9], 0);
    assert_eq!(inspect(&one_d[..], 9 + 128).unwrap().schema, "npy |u1 (*,)");
}

#[test]
fn inspect_checks_object_pickles() {
    let f = Pickler::npy(Style::Np2, &samples(0..30), 8);
    let info = inspect(&f[..], f.len() as u64).unwrap();
    assert_eq!(info.count, 30);
    assert_eq!(
        info.schema,
        "npy object dict keys [extra, f, id, name, ok, score]"
    );
    // Every cut of the pickle is caught.
    for cut in (info.data_offset as usize..f.len()).step_by(7) {
        let e = inspect(&f[..cut], cut as u64).unwrap_err();
        assert!(matches!(e, FormatError::Truncated { .. }), "cut {cut}: {e}");
    }
    // Same elements, the header claiming one more.
    let mut lying = f.clone();
    let h = header::read_header(&mut &f[..]).unwrap();
    let new_header = write_header(&Descr::Object, &[31]).unwrap();
    lying.splice(..h.data_offset as usize, new_header);
    assert!(matches!(
        inspect(&lying[..], lying.len() as u64),
        Err(FormatError::CountMismatch { .. })
    ));
    // An unknown opcode.
    let mut bad = f.clone();
    let at = bad.len() - 2;
    bad[at] = 0xff;
    assert!(matches!(
        inspect(&bad[..], bad.len() as u64),
        Err(FormatError::BadPickle { .. })
    ));
    // An element with other keys is named by index.
    let mut items = samples(0..20);
    items[13] = T::D(vec![("id".into(), T::I(1))]);
    let odd = Pickler::npy(Style::Np1, &items, 8);
    match inspect(&odd[..], odd.len() as u64).unwrap_err() {
        FormatError::InconsistentElements { index, reason } => {
            assert_eq!(index, 13);
            assert!(
                reason.contains("missing [extra, f, name, ok, score]"),
                "{reason}"
            );
        }
        e => panic!("{e}"),
    }
    let mut items = samples(0..4);
    items[2] = T::F(1.0);
    let mixed = Pickler::npy(Style::Np1, &items, 8);
    assert!(matches!(
        inspect(&mixed[..], mixed.len() as u64),
        Err(FormatError::InconsistentElements { index: 2, .. })
    ));
    let floats = Pickler::npy(Style::Np2, &[T::F(1.0), T::N, T::S("x".into())], 8);
    assert_eq!(
        inspect(&floats[..], floats.len() as u64).unwrap().schema,
        "npy object values"
    );
    let empty = Pickler::npy(Style::Np2, &[], 8);
    assert_eq!(
        inspect(&empty[..], empty.len() as u64).unwrap().schema,
        "npy object empty"
    );
}

#[test]
fn shared_dicts_keep_keys_after_compaction() {
    // Element 1200 is element 3 again: by then the memo entry for it is compacted.
    let mut items = samples(0..1300);
    items[1200] = T::Again(3);
    let f = Pickler::npy(Style::Np2, &items, 1000);
    let info = inspect(&f[..], f.len() as u64).unwrap();
    assert_eq!(info.count, 1300);
}

#[test]
fn refuses_elements_that_reuse_the_array_or_its_list() {
    // numpy 2 style memo: 9 is the `_reconstruct(...)` result, 18 the data list. Copying
    // either into the output would not give the same object.
    for (idx, what) in [(9u8, "memo entry 9"), (18, "data list")] {
        let f = Pickler::npy(
            Style::Np2,
            &[sample(0), T::Raw(vec![op::BINGET, idx])],
            1000,
        );
        let mut out = Vec::new();
        let e = merge(&[2], 2, |_| Ok(Cursor::new(f.clone())), &mut out).unwrap_err();
        assert!(matches!(e.root(), FormatError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    }
    // A string from the prologue is copied instead.
    let el = T::D(vec![("m".into(), T::Raw(vec![op::BINGET, 0]))]);
    let f = Pickler::npy(Style::Np2, &[el.clone(), el], 1000);
    check_merge(&[f.clone(), f], 3);
}

#[test]
fn header_descr_helpers() {
    assert_eq!(PyLit::parse("'<f4'").unwrap(), PyLit::Str("<f4".into()));
}
