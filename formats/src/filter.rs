//! The per-sample quality filter: `<field> <op> <number>`, e.g. `E_pen <= 0.02`. A sample is
//! kept when its field compares true; a NaN never does. `field` is a dotted path into the
//! sample (`statistics.num_timesteps`); each format says what its fields are.

use std::fmt;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Cmp {
    fn symbol(self) -> &'static str {
        match self {
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
        }
    }
}

/// Keep a sample when `field op value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub field: String,
    pub op: Cmp,
    pub value: f64,
}

/// A filter expression that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{expr:?}: {problem}; write it as `<field> <op> <number>` with op one of < <= > >= == !=, e.g. \"E_pen <= 0.02\""
)]
pub struct FilterError {
    pub expr: String,
    pub problem: String,
}

impl Filter {
    /// Parses `<field> <op> <number>` (spaces around the operator optional).
    pub fn parse(expr: &str) -> Result<Filter, FilterError> {
        let err = |problem: &str| FilterError {
            expr: expr.to_string(),
            problem: problem.to_string(),
        };
        let at = expr
            .find(['<', '>', '=', '!'])
            .ok_or_else(|| err("no comparison operator"))?;
        let (field, rest) = expr.split_at(at);
        let field = field.trim();
        let (op, number) = [
            ("<=", Cmp::Le),
            (">=", Cmp::Ge),
            ("==", Cmp::Eq),
            ("!=", Cmp::Ne),
            ("<", Cmp::Lt),
            (">", Cmp::Gt),
        ]
        .into_iter()
        .find_map(|(s, op)| rest.strip_prefix(s).map(|n| (op, n)))
        .ok_or_else(|| err("unknown operator"))?;
        if field.is_empty() {
            return Err(err("no field before the operator"));
        }
        if !field
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(err(
                "the field must be a dotted path of letters, digits and underscores",
            ));
        }
        let value: f64 = number
            .trim()
            .parse()
            .map_err(|_| err("the right-hand side is not a number"))?;
        if value.is_nan() {
            return Err(err("the right-hand side is NaN"));
        }
        Ok(Filter {
            field: field.to_string(),
            op,
            value,
        })
    }

    /// Whether a sample whose field holds `v` is kept.
    pub fn keeps(&self, v: f64) -> bool {
        match self.op {
            Cmp::Lt => v < self.value,
            Cmp::Le => v <= self.value,
            Cmp::Gt => v > self.value,
            Cmp::Ge => v >= self.value,
            Cmp::Eq => v == self.value,
            Cmp::Ne => !v.is_nan() && v != self.value,
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.field, self.op.symbol(), self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_keeps() {
        let f = Filter::parse("E_pen <= 0.02").expect("parses");
        assert_eq!(f.field, "E_pen");
        assert_eq!(f.op, Cmp::Le);
        assert!(f.keeps(0.02) && f.keeps(-1.0) && !f.keeps(0.03) && !f.keeps(f64::NAN));
        let g = Filter::parse("statistics.num_timesteps>100").expect("parses");
        assert_eq!(g.field, "statistics.num_timesteps");
        assert_eq!(g.op, Cmp::Gt);
        assert!(g.keeps(101.0) && !g.keeps(100.0));
        assert!(Filter::parse("success != 0").expect("parses").keeps(1.0));
        assert!(
            !Filter::parse("success != 0")
                .expect("parses")
                .keeps(f64::NAN)
        );
        assert_eq!(Filter::parse(&f.to_string()).expect("display parses"), f);
    }

    #[test]
    fn bad_expressions_say_why() {
        for (expr, problem) in [
            ("E_pen 0.02", "no comparison operator"),
            ("<= 3", "no field"),
            ("E_pen <= x", "not a number"),
            ("E pen <= 1", "dotted path"),
            ("a..b < 1", "dotted path"),
            ("E_pen =< 1", "unknown operator"),
        ] {
            let e = Filter::parse(expr).expect_err(expr);
            assert!(e.problem.contains(problem), "{expr}: {e}");
            assert!(e.to_string().contains("E_pen <= 0.02"), "{e}");
        }
    }
}
