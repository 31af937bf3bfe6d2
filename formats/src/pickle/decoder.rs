//! A small pickle evaluator: enough of Python's unpickler to see the structure numpy writes
//! (the `_reconstruct` call, its state tuple, the dicts in the data list) without Python.
//! Calls (`REDUCE`, `NEWOBJ`, `BUILD`) are recorded, never performed.
//!
//! Memory stays bounded by what the caller keeps: long strings and bytes are kept as their
//! length only, nesting is capped, and [`Decoder::compact_memo`] lets a caller shrink memo
//! entries once the element that made them is done.

use std::cell::RefCell;
use std::io::BufRead;
use std::rc::Rc;

use super::FormatError;
use super::memo::ValueMemo;
use super::opcodes::{ArgKind, name, op};
use super::reader::{Op, OpReader};
use super::value::{Call, Kind, MAX_NEST, Map, Obj, Seq, Value};

/// Longest string or bytes value kept whole; longer ones keep only their length.
pub(crate) const KEEP_PAYLOAD: usize = 4096;

/// What the caller should do after an opcode.
#[derive(Debug)]
pub(crate) enum Step {
    Continue,
    /// The data list was just pushed; the next opcodes build its elements.
    DataList,
    /// Elements were appended to the data list; take them with [`Decoder::take_elements`].
    Elements,
    /// `STOP`: the unpickled value.
    Stop(Value),
}

/// Evaluates pickle opcodes into [`Value`]s.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    stack: Vec<Value>,
    marks: Vec<usize>,
    pub memo: ValueMemo,
    pub proto: u8,
    /// The array `_reconstruct` made, once the data list is found: the one object GETs from the
    /// data list must never copy, since the final array only exists after the data list.
    pub array: Option<Rc<RefCell<Obj>>>,
    elements: Vec<Value>,
    /// Longest string or bytes payload kept whole, when not [`KEEP_PAYLOAD`].
    pub keep_payload: Option<usize>,
    /// Memo indices set since the last [`Decoder::compact_memo`].
    recent: Vec<u32>,
    scratch: Vec<u8>,
}

fn bad(op: &Op, reason: impl Into<String>) -> FormatError {
    FormatError::BadPickle {
        offset: op.offset,
        reason: reason.into(),
    }
}

/// The error for an opcode that would make `what` hold itself (directly or through values it
/// holds): a recursive value, legal Python but not a tree.
fn recursive(op: &Op, what: &Value) -> FormatError {
    FormatError::Unsupported {
        reason: format!(
            "a recursive value at pickle byte {}: {} {} a {} that is already inside another \
             value, or is its own item (Python's pickler writes that only for a value that \
             holds itself); Quarry reads only values without cycles",
            op.offset,
            name(op.code),
            match op.code {
                op::BUILD => "sets the state of",
                _ => "adds to",
            },
            what.type_name()
        ),
    }
}

/// Refuses to change `container` (about to receive `items`) when it is already inside
/// another value or is one of the items: either would close a cycle (see [`Value::nest`]).
fn check_growth(op: &Op, container: &Value, items: &[Value]) -> Result<(), FormatError> {
    if container.is_nested() || items.iter().any(|it| it.same_container(container)) {
        return Err(recursive(op, container));
    }
    Ok(())
}

fn unsupported(op: &Op) -> FormatError {
    FormatError::Unsupported {
        reason: format!(
            "pickle opcode {} at offset {} (numpy's object arrays never use it)",
            name(op.code),
            op.offset
        ),
    }
}

impl Decoder {
    /// Elements appended to the data list since the last call.
    pub fn take_elements(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.elements)
    }

    /// The `(1, shape, dtype, fortran, [data])` state tuple being built when the data list is
    /// on top: the array's shape and the module `_reconstruct` came from.
    pub fn array_layout(&self) -> Option<(Vec<u64>, String)> {
        let Some(Value::Object(arr)) = self.stack.first() else {
            return None;
        };
        let module = match &arr.borrow().callable {
            Value::Global(g) => g.0.clone(),
            _ => return None,
        };
        let Some(Value::Tuple(shape)) = self.stack.get(2) else {
            return None;
        };
        let shape = shape
            .items
            .iter()
            .map(|d| match d {
                Value::Int(n) => u64::try_from(*n).ok(),
                _ => None,
            })
            .collect::<Option<Vec<u64>>>()?;
        Some((shape, module))
    }

    /// Whether an `EMPTY_LIST` now would be the 5th item of the ndarray state tuple, the way
    /// `ndarray.__reduce__` lays it out: `_reconstruct(...)`, MARK, 1, shape, dtype, fortran.
    fn at_data_list_slot(&self) -> bool {
        if self.array.is_some() || self.marks != [1] || self.stack.len() != 5 {
            return false;
        }
        let reconstruct = match &self.stack[0] {
            Value::Object(o) => matches!(&o.borrow().callable,
                Value::Global(g) if g.1 == "_reconstruct" && g.0.starts_with("numpy")),
            _ => false,
        };
        reconstruct
            && matches!(self.stack[1], Value::Int(1))
            && matches!(self.stack[2], Value::Tuple(_))
            && matches!(self.stack[4], Value::Bool(_))
    }

    fn pop(&mut self, op: &Op) -> Result<Value, FormatError> {
        let floor = self.marks.last().map_or(0, |m| *m);
        if self.stack.len() <= floor {
            return Err(bad(op, format!("{} on an empty stack", name(op.code))));
        }
        self.stack.pop().ok_or_else(|| bad(op, "stack underflow"))
    }

    fn pop_mark(&mut self, op: &Op) -> Result<Vec<Value>, FormatError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| bad(op, format!("{} without a mark", name(op.code))))?;
        Ok(self.stack.split_off(m))
    }

    fn top(&mut self, op: &Op) -> Result<&Value, FormatError> {
        let floor = self.marks.last().map_or(0, |m| *m);
        if self.stack.len() <= floor {
            return Err(bad(op, format!("{} on an empty stack", name(op.code))));
        }
        self.stack.last().ok_or_else(|| bad(op, "stack underflow"))
    }

    fn memo_put(&mut self, op: &Op, idx: u32) -> Result<(), FormatError> {
        let v = self.top(op)?.clone();
        self.memo.insert(idx, v);
        self.recent.push(idx);
        Ok(())
    }

    /// Replaces every memo entry set since the last call by `f(entry)`. Lets a caller drop the
    /// content of finished elements while later GETs of them still resolve.
    pub fn compact_memo(&mut self, mut f: impl FnMut(&Value) -> Value) {
        for idx in std::mem::take(&mut self.recent) {
            self.memo.compact(idx, &mut f);
        }
    }

    fn payload<R: BufRead>(&mut self, rd: &mut OpReader<R>) -> Result<bool, FormatError> {
        rd.read_payload(&mut self.scratch, self.keep_payload.unwrap_or(KEEP_PAYLOAD))
    }

    /// Applies one opcode (already read from `rd`, whose payload is still unread).
    pub fn apply<R: BufRead>(
        &mut self,
        op: &Op,
        rd: &mut OpReader<R>,
    ) -> Result<Step, FormatError> {
        let v = match op.code {
            op::MARK => {
                self.marks.push(self.stack.len());
                return Ok(Step::Continue);
            }
            op::STOP => return Ok(Step::Stop(self.pop(op)?)),
            op::POP => {
                let floor = self.marks.last().copied();
                if floor.is_some_and(|m| m == self.stack.len()) {
                    self.marks.pop();
                } else {
                    self.pop(op)?;
                }
                return Ok(Step::Continue);
            }
            op::POP_MARK => {
                self.pop_mark(op)?;
                return Ok(Step::Continue);
            }
            op::DUP => self.top(op)?.clone(),
            op::FLOAT => {
                let t = std::str::from_utf8(rd.line()).map_err(|_| bad(op, "FLOAT not text"))?;
                Value::Float(t.trim().parse().map_err(|_| bad(op, "bad FLOAT"))?)
            }
            op::INT | op::LONG => {
                let t = std::str::from_utf8(rd.line()).map_err(|_| bad(op, "INT not text"))?;
                let t = t.trim().trim_end_matches('L');
                match (op.code, t) {
                    (op::INT, "00") => Value::Bool(false),
                    (op::INT, "01") => Value::Bool(true),
                    _ => match t.parse::<i64>() {
                        Ok(n) => Value::Int(n),
                        Err(_)
                            if !t.is_empty()
                                && t.trim_start_matches('-')
                                    .bytes()
                                    .all(|b| b.is_ascii_digit()) =>
                        {
                            Value::Opaque(Kind::Int)
                        }
                        Err(_) => return Err(bad(op, "bad INT")),
                    },
                }
            }
            op::BININT | op::BININT1 | op::BININT2 => Value::Int(op.int),
            op::NONE => Value::None,
            op::REDUCE | op::NEWOBJ => {
                let args = self.pop(op)?;
                let callable = self.pop(op)?;
                let call = if op.code == op::NEWOBJ {
                    Call::NewObj
                } else {
                    Call::Reduce
                };
                self.object(callable, args, call)
            }
            op::NEWOBJ_EX => {
                let kwargs = self.pop(op)?;
                let args = self.pop(op)?;
                let cls = self.pop(op)?;
                let args = self.tuple(vec![args, kwargs]);
                self.object(cls, args, Call::Other)
            }
            op::STRING => {
                let raw = rd.line();
                let inner = raw
                    .strip_prefix(b"'")
                    .and_then(|r| r.strip_suffix(b"'"))
                    .or_else(|| raw.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")))
                    .ok_or_else(|| bad(op, "STRING not quoted"))?;
                match std::str::from_utf8(inner) {
                    Ok(s) if !s.contains('\\') => Value::Str(Rc::new(s.to_string())),
                    _ => Value::Opaque(Kind::Str),
                }
            }
            op::UNICODE => {
                let raw = rd.line();
                if raw.contains(&b'\\') {
                    Value::Opaque(Kind::Str)
                } else {
                    // raw-unicode-escape without escapes is latin-1.
                    Value::Str(Rc::new(raw.iter().map(|&b| b as char).collect()))
                }
            }
            op::BINSTRING | op::SHORT_BINSTRING => {
                // numpy loads with encoding='ASCII', so Python 2 str becomes str.
                if self.payload(rd)? && self.scratch.is_ascii() {
                    Value::Str(Rc::new(String::from_utf8_lossy(&self.scratch).into_owned()))
                } else {
                    Value::Opaque(Kind::Str)
                }
            }
            op::BINUNICODE | op::SHORT_BINUNICODE | op::BINUNICODE8 => {
                if self.payload(rd)? {
                    match std::str::from_utf8(&self.scratch) {
                        Ok(s) => Value::Str(Rc::new(s.to_string())),
                        // Python writes lone surrogates with surrogatepass; keep them opaque.
                        Err(_) => Value::Opaque(Kind::Str),
                    }
                } else {
                    Value::Opaque(Kind::Str)
                }
            }
            op::BINBYTES | op::SHORT_BINBYTES | op::BINBYTES8 => {
                if self.payload(rd)? {
                    Value::Bytes(Rc::new(self.scratch.clone()))
                } else {
                    Value::Opaque(Kind::Bytes)
                }
            }
            op::BYTEARRAY8 => {
                rd.skip_payload()?;
                Value::Opaque(Kind::ByteArray)
            }
            op::LONG1 | op::LONG4 => {
                if !self.payload(rd)? {
                    Value::Opaque(Kind::Int)
                } else if self.scratch.len() <= 8 {
                    let neg = self.scratch.last().is_some_and(|b| b & 0x80 != 0);
                    let mut b = [if neg { 0xff } else { 0 }; 8];
                    b[..self.scratch.len()].copy_from_slice(&self.scratch);
                    Value::Int(i64::from_le_bytes(b))
                } else {
                    Value::BigInt(Rc::new(self.scratch.clone()))
                }
            }
            op::APPEND => {
                let item = self.pop(op)?;
                return self.extend(op, vec![item]);
            }
            op::APPENDS => {
                let items = self.pop_mark(op)?;
                return self.extend(op, items);
            }
            op::BUILD => {
                let state = self.pop(op)?;
                let state = Self::capped(state);
                let array = self.array.clone();
                if let Value::Object(o) = self.top(op)? {
                    let target = Value::Object(o.clone());
                    // The array's own BUILD (its state holds the data list, not the elements)
                    // may follow elements that refer to the array.
                    if state.same_container(&target) {
                        return Err(recursive(op, &target));
                    }
                    if !array.as_ref().is_some_and(|a| Rc::ptr_eq(a, o)) {
                        check_growth(op, &target, std::slice::from_ref(&state))?;
                    }
                    state.nest();
                    let mut o = o.borrow_mut();
                    o.depth = o.depth.max(state.depth() + 1);
                    o.state = Some(state);
                }
                // BUILD on anything else would call its __setstate__; nothing to record.
                return Ok(Step::Continue);
            }
            op::GLOBAL => {
                let (m, n) = rd.two_lines();
                let text = |b: &[u8]| std::str::from_utf8(b).map(str::to_string);
                let (m, n) = (text(m), text(n));
                let (Ok(m), Ok(n)) = (m, n) else {
                    return Err(bad(op, "GLOBAL name is not UTF-8"));
                };
                Value::Global(Rc::new((m, n)))
            }
            op::STACK_GLOBAL => {
                let n = self.pop(op)?;
                let m = self.pop(op)?;
                match (m, n) {
                    (Value::Str(m), Value::Str(n)) => {
                        Value::Global(Rc::new(((*m).clone(), (*n).clone())))
                    }
                    _ => return Err(bad(op, "STACK_GLOBAL of non-strings")),
                }
            }
            op::INST => {
                let (m, n) = rd.two_lines();
                let g = Value::Global(Rc::new((
                    String::from_utf8_lossy(m).into_owned(),
                    String::from_utf8_lossy(n).into_owned(),
                )));
                let args = self.pop_mark(op)?;
                let args = self.tuple(args);
                self.object(g, args, Call::Other)
            }
            op::OBJ => {
                let mut items = self.pop_mark(op)?;
                if items.is_empty() {
                    return Err(bad(op, "OBJ without a class"));
                }
                let cls = items.remove(0);
                let args = self.tuple(items);
                self.object(cls, args, Call::Other)
            }
            op::DICT => {
                let items = self.pop_mark(op)?;
                let m = Rc::new(RefCell::new(Map::default()));
                Self::set_items(op, &m, items)?;
                Value::Dict(m)
            }
            op::EMPTY_DICT => Value::Dict(Rc::new(RefCell::new(Map::default()))),
            op::SETITEM => {
                let v = self.pop(op)?;
                let k = self.pop(op)?;
                if let Value::Dict(m) = self.top(op)? {
                    let m = m.clone();
                    check_growth(op, &Value::Dict(m.clone()), &[k.clone(), v.clone()])?;
                    Self::set_items(op, &m, vec![k, v])?;
                }
                return Ok(Step::Continue);
            }
            op::SETITEMS => {
                let items = self.pop_mark(op)?;
                if let Value::Dict(m) = self.top(op)? {
                    let m = m.clone();
                    check_growth(op, &Value::Dict(m.clone()), &items)?;
                    Self::set_items(op, &m, items)?;
                }
                return Ok(Step::Continue);
            }
            op::GET | op::BINGET | op::LONG_BINGET => {
                let idx = memo_index(op, rd)?;
                self.memo
                    .get(idx)
                    .ok_or_else(|| bad(op, format!("memo entry {idx} read before it is written")))?
            }
            op::PUT | op::BINPUT | op::LONG_BINPUT => {
                let idx = memo_index(op, rd)?;
                self.memo_put(op, idx)?;
                return Ok(Step::Continue);
            }
            op::MEMOIZE => {
                let idx = self.memo.len();
                self.memo_put(op, idx)?;
                return Ok(Step::Continue);
            }
            op::LIST => {
                let items = self.pop_mark(op)?;
                Value::List(Rc::new(RefCell::new(Self::seq(items))))
            }
            op::EMPTY_LIST => {
                if self.at_data_list_slot() {
                    if let Some(Value::Object(arr)) = self.stack.first() {
                        self.array = Some(arr.clone());
                    }
                    self.stack.push(Value::DataList);
                    return Ok(Step::DataList);
                }
                Value::List(Rc::new(RefCell::new(Seq::default())))
            }
            op::TUPLE => {
                let items = self.pop_mark(op)?;
                self.tuple(items)
            }
            op::EMPTY_TUPLE => self.tuple(Vec::new()),
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = (op.code - op::TUPLE1 + 1) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop(op)?);
                }
                items.reverse();
                self.tuple(items)
            }
            op::BINFLOAT => Value::Float(rd.float8()),
            op::PROTO => {
                if op.int > 5 {
                    return Err(FormatError::Unsupported {
                        reason: format!("pickle protocol {}", op.int),
                    });
                }
                self.proto = op.int as u8;
                return Ok(Step::Continue);
            }
            op::NEWTRUE => Value::Bool(true),
            op::NEWFALSE => Value::Bool(false),
            op::EMPTY_SET => Value::Set(Rc::new(RefCell::new(Seq::default()))),
            op::ADDITEMS => {
                let items = self.pop_mark(op)?;
                if let Value::Set(s) = self.top(op)? {
                    check_growth(op, &Value::Set(s.clone()), &items)?;
                    let mut s = s.borrow_mut();
                    for it in items {
                        Self::push_capped(&mut s, it);
                    }
                }
                return Ok(Step::Continue);
            }
            op::FROZENSET => {
                let items = self.pop_mark(op)?;
                Value::FrozenSet(Rc::new(Self::seq(items)))
            }
            op::FRAME => return Ok(Step::Continue),
            _ => return Err(unsupported(op)),
        };
        self.stack.push(v);
        Ok(Step::Continue)
    }

    fn capped(v: Value) -> Value {
        if v.depth() >= MAX_NEST {
            Value::Opaque(Kind::Deep)
        } else {
            v
        }
    }

    /// Appends `v` (which must not be `s`'s own container, and is nested from now on).
    fn push_capped(s: &mut Seq, v: Value) {
        v.nest();
        let v = Self::capped(v);
        s.depth = s.depth.max(v.depth() + 1);
        s.items.push(v);
    }

    fn seq(items: Vec<Value>) -> Seq {
        let mut s = Seq {
            items: Vec::with_capacity(items.len()),
            depth: 1,
            nested: false,
        };
        for it in items {
            Self::push_capped(&mut s, it);
        }
        s
    }

    fn tuple(&self, items: Vec<Value>) -> Value {
        Value::Tuple(Rc::new(Self::seq(items)))
    }

    fn object(&self, callable: Value, args: Value, call: Call) -> Value {
        callable.nest();
        args.nest();
        let (callable, args) = (Self::capped(callable), Self::capped(args));
        let depth = callable.depth().max(args.depth()) + 1;
        Value::Object(Rc::new(RefCell::new(Obj {
            callable,
            args,
            state: None,
            call,
            depth,
            nested: false,
        })))
    }

    fn set_items(op: &Op, m: &Rc<RefCell<Map>>, items: Vec<Value>) -> Result<(), FormatError> {
        if !items.len().is_multiple_of(2) {
            return Err(bad(op, "odd number of items for a dict"));
        }
        // Nested before `m` is borrowed: no item is `m` itself (see `check_growth`).
        for it in &items {
            it.nest();
        }
        let mut m = m.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let (k, v) = (Self::capped(k), Self::capped(v));
            m.depth = m.depth.max(k.depth().max(v.depth()) + 1);
            m.items.push((k, v));
        }
        Ok(())
    }

    fn extend(&mut self, op: &Op, items: Vec<Value>) -> Result<Step, FormatError> {
        match self.top(op)? {
            Value::DataList => {
                self.elements.extend(items);
                Ok(Step::Elements)
            }
            Value::List(l) => {
                check_growth(op, &Value::List(l.clone()), &items)?;
                let mut l = l.borrow_mut();
                for it in items {
                    Self::push_capped(&mut l, it);
                }
                Ok(Step::Continue)
            }
            // APPEND on other objects calls their append/extend; nothing to record.
            _ => Ok(Step::Continue),
        }
    }
}

/// The memo index a GET/PUT-family op names.
pub(crate) fn memo_index<R: BufRead>(op: &Op, rd: &OpReader<R>) -> Result<u32, FormatError> {
    let v = if op.kind == ArgKind::Line {
        std::str::from_utf8(rd.line())
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .ok_or_else(|| bad(op, "bad memo index"))?
    } else {
        op.int
    };
    u32::try_from(v).map_err(|_| bad(op, format!("memo index {v} out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(data: &[u8]) -> Value {
        let mut d = Decoder::default();
        let mut r = OpReader::new(data);
        while let Some(op) = r.next_op().unwrap() {
            if let Step::Stop(v) = d.apply(&op, &mut r).unwrap() {
                return v;
            }
        }
        panic!("no STOP");
    }

    #[test]
    fn decodes_a_dict_with_memo_reuse() {
        // pickle.dumps([{'a': 1, 'b': 'x'}, {'a': 2.5, 'b': None}], 3) by hand.
        let data = b"\x80\x03]q\x00(}q\x01(X\x01\x00\x00\x00aq\x02K\x01X\x01\x00\x00\x00bq\x03X\x01\x00\x00\x00xq\x04u}q\x05(h\x02G@\x04\x00\x00\x00\x00\x00\x00h\x03Nue.";
        let Value::List(l) = decode(data) else {
            panic!()
        };
        let l = l.borrow();
        assert_eq!(l.items.len(), 2);
        let keys: Vec<_> = l.items.iter().map(|v| v.dict_keys().unwrap()).collect();
        assert_eq!(keys[0], keys[1]);
        assert_eq!(keys[0].iter().cloned().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn caps_nesting() {
        let mut data = b"\x80\x04N".to_vec();
        data.extend(std::iter::repeat_n(0x85u8, 10_000)); // TUPLE1, 10,000 deep
        data.push(b'.');
        let v = decode(&data);
        assert!(v.depth() <= MAX_NEST);
    }

    fn decode_err(data: &[u8]) -> FormatError {
        let mut d = Decoder::default();
        let mut r = OpReader::new(data);
        while let Some(op) = r.next_op().unwrap() {
            match d.apply(&op, &mut r) {
                Ok(Step::Stop(_)) => panic!("decoded"),
                Ok(_) => {}
                Err(e) => return e,
            }
        }
        panic!("no STOP");
    }

    #[test]
    fn refuses_values_that_hold_themselves() {
        // d = {}; d['s'] = d: EMPTY_DICT MEMOIZE 's' GET0 SETITEM.
        let e = decode_err(b"\x80\x04}\x94\x8c\x01s\x94h\x00s.");
        assert!(e.to_string().contains("a recursive value"), "{e}");
        // l = []; l.append(l).
        let e = decode_err(b"\x80\x04]\x94h\x00a.");
        assert!(e.to_string().contains("a recursive value"), "{e}");
        // s = set(); s.add(s) (unhashable in Python, but a stream can say it).
        let e = decode_err(b"\x80\x04\x8f\x94(h\x00\x90.");
        assert!(e.to_string().contains("a recursive value"), "{e}");
    }

    #[test]
    fn refuses_growing_a_nested_list() {
        // 100,000 empty lists memoized first, then each appended to the one before: a chain
        // whose recorded depth would stay 2 (each list nested before it grew), so dropping it
        // would recurse 100,000 deep. The second APPEND already grows a nested list.
        let n = 100_000u32;
        let mut data = b"\x80\x04".to_vec();
        for i in 0..n {
            data.push(b']');
            data.push(b'r'); // LONG_BINPUT
            data.extend_from_slice(&i.to_le_bytes());
        }
        for i in 0..n - 1 {
            data.push(b'j'); // LONG_BINGET
            data.extend_from_slice(&i.to_le_bytes());
            data.push(b'j');
            data.extend_from_slice(&(i + 1).to_le_bytes());
            data.push(b'a'); // APPEND
            data.push(b'0'); // POP
        }
        data.push(b'.');
        let e = decode_err(&data);
        assert!(e.to_string().contains("a recursive value"), "{e}");
    }

    #[test]
    fn key_reprs() {
        let s = |x: &str| Value::Str(Rc::new(x.into()));
        assert_eq!(s("grasp_pose").key_repr(), "grasp_pose");
        assert_eq!(s("a, b").key_repr(), "'a, b'");
        assert_eq!(Value::Int(3).key_repr(), "3");
        let t = Value::Tuple(Rc::new(Decoder::seq(vec![s("x"), Value::None])));
        assert_eq!(t.key_repr(), "('x', None)");
    }
}
