//! [`instance`]: a deterministic JSON value that validates against a JSON Schema, for the
//! `mock` provider's structured outputs (`response_format: json_schema`) and forced tool calls
//! (the arguments of a call are an instance of the tool's `parameters`). Pure: no I/O, no
//! clock, no randomness; the same schema always gives the same value.
//!
//! # Rules
//! Applied in this order to each (sub)schema:
//! - **`$ref`** to a local pointer (`#/$defs/…`, `#/definitions/…`, any `#/…`, `#`) is
//!   resolved against the root schema, its sibling keywords merged over the target. A
//!   recursion guard: a `$ref` met when the same `$ref` is already expanded [`REF_REPEATS`]
//!   times on the path from the top is generated *smallest*, and so is everything under it:
//!   `anyOf`/`oneOf` take a `null` branch if there is one, objects get only their `required`
//!   properties, arrays `minItems` items (0 by default); so a tree of `children` is 3 levels
//!   deep, the last with `children: []`. Past [`MAX_DEPTH`] levels of nesting, `null`. A
//!   `$ref` that does not resolve is treated as `{}`.
//! - **`allOf`**: the branches are merged best-effort into one schema: `properties` and
//!   `required` united (a property in two branches gets both schemas as its own `allOf`),
//!   `minimum`/`exclusiveMinimum`/`minLength`/`minItems` the largest, `maximum`/
//!   `exclusiveMaximum`/`maxLength`/`maxItems` the smallest, `type` and `enum` intersected,
//!   any other keyword the first one given.
//! - **`anyOf`/`oneOf`**: the first branch (merged with the keywords beside it).
//! - **`const`** → it. **`enum`** → its first value (in a `uniqueItems` array, item *i* gets
//!   value *i* while there are enough).
//! - **`type`**: a string, or an array whose first non-`null` type is used (`["x", "null"]` →
//!   an x; `nullable: true` is ignored, so also an x); `["null"]`/`"null"` → `null`. Without
//!   `type` it is inferred from the keywords: `properties`/`required`/`additionalProperties` →
//!   object, `items`/`prefixItems`/`minItems`/`maxItems`/`uniqueItems` → array,
//!   `format`/`pattern`/`minLength`/`maxLength` → string, `minimum`/`maximum`/
//!   `exclusiveMinimum`/`exclusiveMaximum`/`multipleOf` → number.
//! - **object**: every property of `properties` (required or optional: a model asked with
//!   `strict` fills every field), then any `required` name that `properties` lacks (from the
//!   `additionalProperties` schema if it is one, else `null`). `additionalProperties` and
//!   `patternProperties` never add other keys. Keys come out in the order of serde_json's
//!   `Map`, sorted by name: the hub parses request bodies without `preserve_order`, so the
//!   schema's own order is gone before the schema reaches this module.
//! - **array**: `minItems` items if `minItems` > 0, else `min(3, maxItems)` items (so 3 by
//!   default). Item *i* (0-based) is generated with index *i* in context (for the string rule
//!   below, and for `uniqueItems`); tuple schemas (`prefixItems`, or an array `items`) give
//!   item *i* its own schema, and `items: false` (or `additionalItems: false`) caps the length
//!   at the tuple's. With `uniqueItems`, an item equal to an earlier one is skipped and the
//!   next index tried (up to 16 extra), so the array may come out shorter only when the items'
//!   domain is too small (an enum of 2 values with `minItems` 0 and the default 3). At most
//!   1,000 items.
//! - **integer**: the lower bound (`minimum` rounded up, or `exclusiveMinimum` + 1 rounded
//!   down first) if given; else `maximum` (or `exclusiveMaximum` - 1) when that is negative;
//!   else 0. An integral `multipleOf` *m* rounds it up to a multiple of *m* (down, if that
//!   passes the upper bound). In a `uniqueItems` array item *i* gets that + *i*·*m* (*m* = 1
//!   without `multipleOf`), or the base value again when that would pass the upper bound.
//! - **number**: the midpoint of the lower and upper bound when both are given (`minimum` or
//!   `exclusiveMinimum`, `maximum` or `exclusiveMaximum`); else `minimum` (or
//!   `exclusiveMinimum` + 1); else `maximum` (or `exclusiveMaximum` - 1); else 0.5.
//!   `multipleOf` *m* rounds it up to a multiple of *m* (down, if that passes the upper
//!   bound). In a `uniqueItems` array item *i* gets that + *i* while within the bounds.
//! - **boolean** → `true` (item *i* of a `uniqueItems` array: `i == 0`).
//! - **string**, first rule that applies:
//!   - `format`: `date-time` → `2025-01-01T00:00:00Z`, `date` → `2025-01-01`, `time` →
//!     `00:00:00Z`, `email` → `mock@example.com`, `uri`/`url`/`uri-reference`/`iri` →
//!     `https://example.com/mock`, `uuid` → `00000000-0000-4000-8000-000000000000`,
//!     `hostname` → `example.com`, `ipv4` → `192.0.2.1`, `ipv6` → `2001:db8::1`,
//!     `duration` → `PT1S`. In a `uniqueItems` array item *i* > 0 varies (`mock<i>@…`,
//!     `…/mock/<i>`, the uuid's last digits, …). Other formats fall through.
//!   - `pattern`: the shortest string the pattern's first alternatives give (each quantified
//!     atom repeated its minimum count, `+` once; a class → its first character, or for a
//!     negated one the first of `aA0_- x.!` outside it; `\d` → `0`, `\w` → `a`, `.` → `a`),
//!     for patterns made of literals, escapes, classes, groups (`(…)`, `(?:…)`, `(?<n>…)`),
//!     `|`, anchors and quantifiers. Any other construct (lookaround, backreference, `\b`,
//!     `\p{…}`, …) gives the fixed string `mock`, which may not match. `minLength`/
//!     `maxLength` are not applied to pattern strings.
//!   - otherwise `<name>[ <index>]: This is a mock answer from apex.` where *name* is the
//!     property's name, `item` for an array's item, `answer` at the top, and *index* the
//!     index of the innermost array item it is inside (a property of an object in an array
//!     has its item's index: `"description 2: This is a mock answer from apex."`); padded
//!     by continuing the mock words (` This is a …`) to `minLength`, cut to `maxLength`
//!     characters.
//! - **anything unrecognised** (no `type` and nothing to infer it from, `{}`, `true`) →
//!   `null` when the schema allows it (it has no `not`), else `{}`; an unknown `type` name
//!   → `{}`.

use std::cell::RefCell;

use serde_json::{Map, Value, json};

use super::mock::word;

/// Expansions of one `$ref` on a path before the next is generated smallest.
pub const REF_REPEATS: usize = 2;
/// Nesting depth past which the value is `null`.
pub const MAX_DEPTH: usize = 64;
/// Most items in one array.
const MAX_ITEMS: u64 = 1000;
/// Extra indices tried when `uniqueItems` skipped a repeated item.
const UNIQUE_RETRIES: u64 = 16;

/// A deterministic instance of `schema`, by the rules of the [module docs](self).
pub fn instance(schema: &Value) -> Value {
    Gen {
        root: schema,
        path: RefCell::new(Vec::new()),
    }
    .value(schema, Ctx::ROOT)
}

/// Where in the instance a value is generated.
#[derive(Debug, Clone, Copy)]
struct Ctx<'n> {
    /// The property name, `item` for array items, `answer` at the top.
    name: &'n str,
    /// The index of the innermost array item this value is in.
    index: Option<u64>,
    /// Whether this value is an item of a `uniqueItems` array.
    unique: bool,
    /// Nesting depth.
    depth: usize,
    /// Generate the smallest valid value (under a recursion, see [`REF_REPEATS`]).
    minimal: bool,
}

impl Ctx<'_> {
    const ROOT: Ctx<'static> = Ctx {
        name: "answer",
        index: None,
        unique: false,
        depth: 0,
        minimal: false,
    };

    /// The context of a child value named `name`.
    fn child<'m>(&self, name: &'m str, index: Option<u64>, unique: bool) -> Ctx<'m> {
        Ctx {
            name,
            index,
            unique,
            depth: self.depth + 1,
            minimal: self.minimal,
        }
    }
}

struct Gen<'r> {
    root: &'r Value,
    /// The `$ref`s expanded on the path from the top to the value being generated.
    path: RefCell<Vec<String>>,
}

impl Gen<'_> {
    fn value(&self, schema: &Value, mut ctx: Ctx<'_>) -> Value {
        if ctx.depth > MAX_DEPTH {
            return Value::Null;
        }
        let depth = self.path.borrow().len();
        let s = self.resolve(schema, &mut ctx);
        let v = self.plain(&s, ctx);
        self.path.borrow_mut().truncate(depth);
        v
    }

    /// The value of a resolved schema.
    fn plain(&self, s: &Map<String, Value>, ctx: Ctx<'_>) -> Value {
        if let Some(c) = s.get("const") {
            return c.clone();
        }
        if let Some(Value::Array(e)) = s.get("enum")
            && let Some(first) = e.first()
        {
            let i = if ctx.unique {
                ctx.index.unwrap_or(0)
            } else {
                0
            };
            return usize::try_from(i)
                .ok()
                .and_then(|i| e.get(i))
                .unwrap_or(first)
                .clone();
        }
        match type_of(s) {
            Some("object") => self.object(s, ctx),
            Some("array") => self.array(s, ctx),
            Some("string") => Value::String(string(s, ctx)),
            Some("integer") => integer(s, ctx),
            Some("number") => number(s, ctx),
            Some("boolean") => Value::Bool(!ctx.unique || ctx.index.unwrap_or(0) == 0),
            Some("null") => Value::Null,
            Some(_) => json!({}),
            None if s.get("not").is_some() => json!({}),
            None => Value::Null,
        }
    }

    /// `schema` with `$ref`, `allOf`, `anyOf` and `oneOf` applied: a schema object of
    /// plain keywords. Each `$ref` expanded is pushed on `path` (the caller truncates it).
    fn resolve(&self, schema: &Value, ctx: &mut Ctx<'_>) -> Map<String, Value> {
        let mut s = match schema {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        for _ in 0..=MAX_DEPTH {
            if let Some(r) = s.remove("$ref") {
                let r = r.as_str().unwrap_or_default().to_owned();
                let mut path = self.path.borrow_mut();
                if path.iter().filter(|p| **p == r).count() >= REF_REPEATS {
                    ctx.minimal = true;
                }
                path.push(r.clone());
                drop(path);
                let target = r.strip_prefix('#').and_then(|p| self.root.pointer(p));
                if let Some(Value::Object(t)) = target {
                    s = merge(t.clone(), s);
                }
                continue;
            }
            if let Some(Value::Array(all)) = s.remove("allOf") {
                for branch in all {
                    let b = self.resolve(&branch, ctx);
                    s = merge(s, b);
                }
                continue;
            }
            let any = s.remove("anyOf");
            let one = s.remove("oneOf");
            if let Some(Value::Array(branches)) = any.or(one) {
                let pick = if ctx.minimal {
                    branches
                        .iter()
                        .find(|b| b.get("type").and_then(Value::as_str) == Some("null"))
                        .or(branches.first())
                } else {
                    branches.first()
                };
                if let Some(b) = pick {
                    let b = self.resolve(b, ctx);
                    s = merge(s, b);
                }
                continue;
            }
            break;
        }
        s
    }

    fn object(&self, s: &Map<String, Value>, ctx: Ctx<'_>) -> Value {
        let required: Vec<&str> = s
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut out = Map::new();
        if let Some(Value::Object(props)) = s.get("properties") {
            for (k, p) in props {
                if ctx.minimal && !required.contains(&k.as_str()) {
                    continue;
                }
                out.insert(k.clone(), self.value(p, ctx.child(k, ctx.index, false)));
            }
        }
        for k in required {
            if !out.contains_key(k) {
                let v = match s.get("additionalProperties") {
                    Some(extra @ Value::Object(_)) => {
                        self.value(extra, ctx.child(k, ctx.index, false))
                    }
                    _ => Value::Null,
                };
                out.insert(k.to_owned(), v);
            }
        }
        Value::Object(out)
    }

    fn array(&self, s: &Map<String, Value>, ctx: Ctx<'_>) -> Value {
        let min = s.get("minItems").and_then(Value::as_u64).unwrap_or(0);
        let max = s.get("maxItems").and_then(Value::as_u64);
        let mut n = if min > 0 || ctx.minimal {
            min
        } else {
            max.map_or(3, |m| m.min(3))
        };
        // Tuples: `prefixItems` (2020-12) or an array `items` (draft 4 to 2019-09).
        let (prefix, rest): (&[Value], Option<&Value>) =
            match (s.get("prefixItems"), s.get("items")) {
                (Some(Value::Array(p)), items) => (p, items),
                (None, Some(Value::Array(p))) => (p, s.get("additionalItems")),
                (_, items) => (&[], items),
            };
        if !prefix.is_empty() && rest == Some(&Value::Bool(false)) {
            n = n.min(prefix.len() as u64).max(min);
        }
        let n = n.min(MAX_ITEMS);
        let unique = s.get("uniqueItems") == Some(&Value::Bool(true));
        let any = Value::Bool(true);
        let mut out: Vec<Value> = Vec::new();
        let tries = if unique { n + UNIQUE_RETRIES } else { n };
        let mut i = 0;
        while (out.len() as u64) < n && i < tries {
            let item = usize::try_from(i)
                .ok()
                .and_then(|i| prefix.get(i))
                .or(rest)
                .unwrap_or(&any);
            let v = self.value(item, ctx.child("item", Some(i), unique));
            i += 1;
            if unique && out.contains(&v) {
                continue;
            }
            out.push(v);
        }
        Value::Array(out)
    }
}

/// Merges schema `b` into `a` (see the `allOf` rule).
fn merge(mut a: Map<String, Value>, b: Map<String, Value>) -> Map<String, Value> {
    for (k, v) in b {
        let Some(old) = a.get_mut(&k) else {
            a.insert(k, v);
            continue;
        };
        match k.as_str() {
            "properties" => {
                if let (Value::Object(op), Value::Object(np)) = (old, v) {
                    for (pk, pv) in np {
                        match op.get_mut(&pk) {
                            Some(existing) => {
                                let both = json!({"allOf": [existing.take(), pv]});
                                *existing = both;
                            }
                            None => {
                                op.insert(pk, pv);
                            }
                        }
                    }
                }
            }
            "required" => {
                if let (Value::Array(or), Value::Array(nr)) = (old, v) {
                    for r in nr {
                        if !or.contains(&r) {
                            or.push(r);
                        }
                    }
                }
            }
            "minimum" | "exclusiveMinimum" | "minLength" | "minItems" | "minProperties" => {
                if let (Some(x), Some(y)) = (old.as_f64(), v.as_f64())
                    && y > x
                {
                    *old = v;
                }
            }
            "maximum" | "exclusiveMaximum" | "maxLength" | "maxItems" | "maxProperties" => {
                if let (Some(x), Some(y)) = (old.as_f64(), v.as_f64())
                    && y < x
                {
                    *old = v;
                }
            }
            "type" => {
                let list = |t: &Value| -> Vec<Value> {
                    match t {
                        Value::Array(a) => a.clone(),
                        t => vec![t.clone()],
                    }
                };
                let other = list(&v);
                let both: Vec<Value> = list(old)
                    .into_iter()
                    .filter(|t| other.contains(t))
                    .collect();
                if !both.is_empty() {
                    *old = Value::Array(both);
                }
            }
            "enum" => {
                if let (Value::Array(oe), Value::Array(ne)) = (&*old, &v) {
                    let both: Vec<Value> = oe.iter().filter(|x| ne.contains(x)).cloned().collect();
                    if !both.is_empty() {
                        *old = Value::Array(both);
                    }
                }
            }
            _ => {}
        }
    }
    a
}

/// The type to generate: `type` (first non-null of an array), else inferred from keywords.
fn type_of(s: &Map<String, Value>) -> Option<&str> {
    match s.get("type") {
        Some(Value::String(t)) => return Some(t),
        Some(Value::Array(a)) => {
            let names: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
            if let Some(t) = names.iter().find(|t| **t != "null") {
                return Some(t);
            }
            if !names.is_empty() {
                return Some("null");
            }
        }
        _ => {}
    }
    let has = |keys: &[&str]| keys.iter().any(|k| s.contains_key(*k));
    if has(&["properties", "required", "additionalProperties"]) {
        Some("object")
    } else if has(&[
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "uniqueItems",
    ]) {
        Some("array")
    } else if has(&["format", "pattern", "minLength", "maxLength"]) {
        Some("string")
    } else if has(&[
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
    ]) {
        Some("number")
    } else {
        None
    }
}

/// A numeric bound: the value and whether it is exclusive. Reads `minimum` with a boolean
/// `exclusiveMinimum` (draft 4) as well as a numeric `exclusiveMinimum` (draft 6 on).
fn bound(s: &Map<String, Value>, inclusive: &str, exclusive: &str) -> Option<(f64, bool)> {
    match (s.get(inclusive).and_then(Value::as_f64), s.get(exclusive)) {
        (Some(x), Some(Value::Bool(true))) => Some((x, true)),
        (incl, Some(e)) if e.is_number() => {
            let e = e.as_f64()?;
            // Both given: the tighter one wins (a larger minimum, a smaller maximum).
            match incl {
                Some(x)
                    if (inclusive == "minimum" && x > e) || (inclusive == "maximum" && x < e) =>
                {
                    Some((x, false))
                }
                _ => Some((e, true)),
            }
        }
        (Some(x), _) => Some((x, false)),
        (None, _) => None,
    }
}

fn clamp_i64(x: f64) -> i64 {
    // `as` saturates at the i64 range (and maps NaN to 0).
    x as i64
}

fn integer(s: &Map<String, Value>, ctx: Ctx<'_>) -> Value {
    let lo = bound(s, "minimum", "exclusiveMinimum").map(|(x, excl)| {
        if excl {
            clamp_i64(x.floor()).saturating_add(1)
        } else {
            clamp_i64(x.ceil())
        }
    });
    let hi = bound(s, "maximum", "exclusiveMaximum").map(|(x, excl)| {
        if excl {
            clamp_i64(x.ceil()).saturating_sub(1)
        } else {
            clamp_i64(x.floor())
        }
    });
    let step = s
        .get("multipleOf")
        .and_then(Value::as_f64)
        .filter(|m| *m >= 1.0 && m.fract() == 0.0)
        .map_or(1, clamp_i64);
    let start = match (lo, hi) {
        (Some(l), _) => l,
        (None, Some(h)) if h < 0 => h,
        _ => 0,
    };
    let mut base = start.div_euclid(step) * step;
    if base < start {
        base = base.saturating_add(step);
    }
    if let Some(h) = hi
        && base > h
    {
        base = h.div_euclid(step) * step;
    }
    let i = if ctx.unique {
        i64::try_from(ctx.index.unwrap_or(0)).unwrap_or(0)
    } else {
        0
    };
    let v = base.saturating_add(i.saturating_mul(step));
    json!(if hi.is_some_and(|h| v > h) { base } else { v })
}

fn number(s: &Map<String, Value>, ctx: Ctx<'_>) -> Value {
    let lo = bound(s, "minimum", "exclusiveMinimum");
    let hi = bound(s, "maximum", "exclusiveMaximum");
    let mut v = match (lo, hi) {
        (Some((l, _)), Some((h, _))) => (l + h) / 2.0,
        (Some((l, excl)), None) => l + if excl { 1.0 } else { 0.0 },
        (None, Some((h, excl))) => h - if excl { 1.0 } else { 0.0 },
        (None, None) => 0.5,
    };
    let within = |x: f64| {
        lo.is_none_or(|(l, e)| if e { x > l } else { x >= l })
            && hi.is_none_or(|(h, e)| if e { x < h } else { x <= h })
    };
    if let Some(m) = s
        .get("multipleOf")
        .and_then(Value::as_f64)
        .filter(|m| *m > 0.0)
    {
        let up = tidy((v / m - 1e-9).ceil() * m);
        let down = tidy((v / m + 1e-9).floor() * m);
        v = if within(up) { up } else { down };
        if ctx.unique {
            let i = ctx.index.unwrap_or(0) as f64;
            let next = tidy(v + i * m);
            if within(next) {
                v = next;
            }
        }
    } else if ctx.unique {
        let next = v + ctx.index.unwrap_or(0) as f64;
        if within(next) {
            v = next;
        }
    }
    json!(v)
}

/// `x` rounded to 12 decimals, so multiples of a decimal `multipleOf` come out as written.
fn tidy(x: f64) -> f64 {
    let r = (x * 1e12).round() / 1e12;
    if r.is_finite() { r } else { x }
}

fn string(s: &Map<String, Value>, ctx: Ctx<'_>) -> String {
    let i = if ctx.unique {
        ctx.index.unwrap_or(0)
    } else {
        0
    };
    if let Some(f) = s.get("format").and_then(Value::as_str)
        && let Some(v) = formatted(f, i)
    {
        return v;
    }
    if let Some(p) = s.get("pattern").and_then(Value::as_str) {
        return pattern::generate(p).unwrap_or_else(|| "mock".to_owned());
    }
    let mut out = match ctx.index {
        Some(i) => format!("{} {i}: ", ctx.name),
        None => format!("{}: ", ctx.name),
    };
    let mut words = 8;
    out.extend((0..words).map(word));
    let min = s.get("minLength").and_then(Value::as_u64).unwrap_or(0);
    let mut len = out.chars().count() as u64;
    while len < min {
        let w = word(words);
        words += 1;
        len += w.chars().count() as u64;
        out.push_str(w);
    }
    if let Some(max) = s.get("maxLength").and_then(Value::as_u64)
        && len > max
    {
        out = out
            .chars()
            .take(usize::try_from(max).unwrap_or(usize::MAX))
            .collect();
    }
    out
}

/// The fixed value of a string `format` (varied by `i` > 0 in a `uniqueItems` array).
fn formatted(format: &str, i: u64) -> Option<String> {
    let v = match (format, i) {
        ("date-time", 0) => "2025-01-01T00:00:00Z".to_owned(),
        ("date-time", i) => format!("2025-01-01T00:{:02}:{:02}Z", (i / 60) % 60, i % 60),
        ("date", 0) => "2025-01-01".to_owned(),
        ("date", i) => format!("2025-01-{:02}", i % 28 + 1),
        ("time", 0) => "00:00:00Z".to_owned(),
        ("time", i) => format!("00:{:02}:{:02}Z", (i / 60) % 60, i % 60),
        ("email" | "idn-email", 0) => "mock@example.com".to_owned(),
        ("email" | "idn-email", i) => format!("mock{i}@example.com"),
        ("uri" | "url" | "uri-reference" | "iri" | "iri-reference", 0) => {
            "https://example.com/mock".to_owned()
        }
        ("uri" | "url" | "uri-reference" | "iri" | "iri-reference", i) => {
            format!("https://example.com/mock/{i}")
        }
        ("uuid", i) => format!("00000000-0000-4000-8000-{i:012x}"),
        ("hostname" | "idn-hostname", 0) => "example.com".to_owned(),
        ("hostname" | "idn-hostname", i) => format!("mock{i}.example.com"),
        ("ipv4", i) => format!("192.0.2.{}", (i + 1) % 255),
        ("ipv6", i) => format!("2001:db8::{:x}", i + 1),
        ("duration", i) => format!("PT{}S", i + 1),
        _ => return None,
    };
    Some(v)
}

/// The best-effort string of a `pattern` (see the string rule of the [module docs](super)).
mod pattern {
    /// The shortest string the pattern's first alternatives give, or `None` for a construct
    /// this does not handle.
    pub fn generate(pattern: &str) -> Option<String> {
        let mut p = Parser {
            c: pattern.chars().collect(),
            i: 0,
        };
        let s = p.alternation()?;
        (p.i == p.c.len()).then_some(s)
    }

    /// Repetitions of one quantified atom at most.
    const MAX_REPEAT: usize = 1000;
    /// Candidates for a negated class, in order.
    const CANDIDATES: &str = "aA0_- x.!";

    struct Parser {
        c: Vec<char>,
        i: usize,
    }

    #[derive(Debug, Clone, Copy)]
    enum Item {
        Range(char, char),
        Digit(bool),
        Word(bool),
        Space(bool),
    }

    impl Item {
        fn matches(self, ch: char) -> bool {
            let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
            match self {
                Item::Range(a, b) => a <= ch && ch <= b,
                Item::Digit(neg) => ch.is_ascii_digit() != neg,
                Item::Word(neg) => is_word(ch) != neg,
                Item::Space(neg) => ch.is_whitespace() != neg,
            }
        }

        fn first(self) -> char {
            match self {
                Item::Range(a, _) => a,
                Item::Digit(false) => '0',
                Item::Word(false) | Item::Digit(true) | Item::Space(true) => 'a',
                Item::Word(true) => '-',
                Item::Space(false) => ' ',
            }
        }
    }

    impl Parser {
        fn peek(&self) -> Option<char> {
            self.c.get(self.i).copied()
        }

        fn next(&mut self) -> Option<char> {
            let c = self.peek()?;
            self.i += 1;
            Some(c)
        }

        /// `a|b|…` up to `)` or the end: the first alternative.
        fn alternation(&mut self) -> Option<String> {
            let first = self.sequence()?;
            while self.peek() == Some('|') {
                self.i += 1;
                self.sequence()?;
            }
            Some(first)
        }

        fn sequence(&mut self) -> Option<String> {
            let mut out = String::new();
            loop {
                match self.peek() {
                    None | Some('|' | ')') => return Some(out),
                    Some('^' | '$') => self.i += 1,
                    Some(_) => {
                        let atom = self.atom()?;
                        let n = self.quantifier()?;
                        out.push_str(&atom.repeat(n));
                    }
                }
            }
        }

        fn atom(&mut self) -> Option<String> {
            match self.next()? {
                '(' => {
                    if self.peek() == Some('?') {
                        self.i += 1;
                        match self.next()? {
                            ':' => {}
                            '<' | 'P' => {
                                if self.peek() == Some('<') {
                                    self.i += 1;
                                }
                                // A lookbehind is not a name.
                                if matches!(self.peek(), Some('=' | '!')) {
                                    return None;
                                }
                                while self.next()? != '>' {}
                            }
                            _ => return None,
                        }
                    }
                    let s = self.alternation()?;
                    (self.next()? == ')').then_some(s)
                }
                '[' => self.class().map(String::from),
                '.' => Some("a".to_owned()),
                '\\' => match self.escape()? {
                    Esc::Char(c) => Some(c.to_string()),
                    Esc::Class(item) => Some(item.first().to_string()),
                },
                '*' | '+' | '?' | '{' | '}' | ']' => None,
                c => Some(c.to_string()),
            }
        }

        fn escape(&mut self) -> Option<Esc> {
            Some(match self.next()? {
                'd' => Esc::Class(Item::Digit(false)),
                'D' => Esc::Class(Item::Digit(true)),
                'w' => Esc::Class(Item::Word(false)),
                'W' => Esc::Class(Item::Word(true)),
                's' => Esc::Class(Item::Space(false)),
                'S' => Esc::Class(Item::Space(true)),
                'n' => Esc::Char('\n'),
                't' => Esc::Char('\t'),
                'r' => Esc::Char('\r'),
                c if c.is_ascii_alphanumeric() => return None,
                c => Esc::Char(c),
            })
        }

        fn class(&mut self) -> Option<char> {
            let negated = self.peek() == Some('^');
            if negated {
                self.i += 1;
            }
            let mut items = Vec::new();
            if self.peek() == Some(']') {
                return None;
            }
            loop {
                let c = self.next()?;
                let lo = match c {
                    ']' => break,
                    '[' => return None,
                    '\\' => match self.escape()? {
                        Esc::Char(c) => c,
                        Esc::Class(item) => {
                            items.push(item);
                            continue;
                        }
                    },
                    c => c,
                };
                if self.peek() == Some('-') && self.c.get(self.i + 1).is_some_and(|c| *c != ']') {
                    self.i += 1;
                    let hi = match self.next()? {
                        '\\' => match self.escape()? {
                            Esc::Char(c) => c,
                            Esc::Class(_) => return None,
                        },
                        c => c,
                    };
                    if hi < lo {
                        return None;
                    }
                    items.push(Item::Range(lo, hi));
                } else {
                    items.push(Item::Range(lo, lo));
                }
            }
            if negated {
                CANDIDATES
                    .chars()
                    .find(|ch| !items.iter().any(|it| it.matches(*ch)))
            } else {
                items.first().map(|it| it.first())
            }
        }

        /// The minimum count of the quantifier after an atom (1 without one).
        fn quantifier(&mut self) -> Option<usize> {
            let n = match self.peek() {
                Some('?' | '*') => {
                    self.i += 1;
                    0
                }
                Some('+') => {
                    self.i += 1;
                    1
                }
                Some('{') => {
                    self.i += 1;
                    let mut digits = String::new();
                    while let Some(c) = self.peek().filter(char::is_ascii_digit) {
                        digits.push(c);
                        self.i += 1;
                    }
                    let n: usize = digits.parse().ok()?;
                    while self.peek().is_some_and(|c| c == ',' || c.is_ascii_digit()) {
                        self.i += 1;
                    }
                    if self.next()? != '}' {
                        return None;
                    }
                    n.min(MAX_REPEAT)
                }
                _ => return Some(1),
            };
            // Lazy or possessive.
            if matches!(self.peek(), Some('?' | '+')) {
                self.i += 1;
            }
            Some(n)
        }
    }

    enum Esc {
        Char(char),
        Class(Item),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::{Value, json};

    use super::instance;

    const WORDS: &str = "This is a mock answer from apex.";

    /// `v` validates against `schema` by the `jsonschema` crate, formats checked.
    fn assert_valid(schema: &Value, v: &Value) {
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(schema)
            .unwrap_or_else(|e| panic!("bad test schema {schema}: {e}"));
        if let Err(e) = validator.validate(v) {
            panic!("{v} does not validate against {schema}: {e}");
        }
    }

    #[test]
    fn refs_resolve_and_recursion_ends_smallest() {
        let s = json!({
            "$defs": {"Step": {"type": "object", "properties": {"title": {"type": "string"}},
                                "required": ["title"]}},
            "type": "object",
            "properties": {"step": {"$ref": "#/$defs/Step"}},
            "required": ["step"]
        });
        assert_eq!(
            instance(&s),
            json!({"step": {"title": "title: This is a mock answer from apex."}})
        );
        let s = json!({"definitions": {"N": {"type": "integer", "minimum": 4}},
                       "$ref": "#/definitions/N"});
        assert_eq!(instance(&s), json!(4));
        // A tree: children are a recursive array; past the depth limit it is empty.
        let tree = json!({
            "$defs": {"Node": {"type": "object",
                "properties": {"name": {"type": "string"},
                               "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
                "required": ["name", "children"]}},
            "$ref": "#/$defs/Node"
        });
        let v = instance(&tree);
        assert_valid(&tree, &v);
        let mut depth = 0;
        let mut n = &v;
        while let Some(first) = n["children"].get(0) {
            n = first;
            depth += 1;
        }
        assert_eq!(depth, super::REF_REPEATS, "{v}");
        assert_eq!(v["children"].as_array().unwrap().len(), 3);
        assert_eq!(n["children"], json!([]));
        // A required self-reference with a null way out takes it.
        let list = json!({"$defs": {"L": {"type": "object", "required": ["next"],
            "properties": {"next": {"anyOf": [{"$ref": "#/$defs/L"}, {"type": "null"}]}}}},
            "$ref": "#/$defs/L"});
        let v = instance(&list);
        assert_valid(&list, &v);
        // An unresolvable `$ref` is `{}`: anything (null).
        assert_eq!(instance(&json!({"$ref": "#/nowhere"})), Value::Null);
    }

    #[test]
    fn all_of_merges_and_any_of_one_of_take_the_first_branch() {
        let s = json!({"allOf": [
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}, "required": ["a"]},
            {"properties": {"a": {"maximum": 9, "minimum": 3}, "b": {"type": "boolean"}}, "required": ["b"]}
        ]});
        let v = instance(&s);
        assert_eq!(v, json!({"a": 3, "b": true}));
        assert_valid(&s, &v);
        let s = json!({"anyOf": [{"type": "integer"}, {"type": "string"}]});
        assert_eq!(instance(&s), json!(0));
        let s = json!({"oneOf": [{"type": "string", "maxLength": 4}, {"type": "integer"}]});
        assert_eq!(instance(&s), json!("answ"));
        // Pydantic's optional field.
        let s = json!({"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null});
        assert_eq!(instance(&s), json!(0));
    }

    #[test]
    fn const_enum_and_type_arrays() {
        assert_eq!(instance(&json!({"const": "fixed"})), json!("fixed"));
        assert_eq!(instance(&json!({"enum": ["low", "high"]})), json!("low"));
        assert_eq!(
            instance(&json!({"type": ["null", "string"], "maxLength": 3})),
            json!("ans")
        );
        assert_eq!(
            instance(&json!({"type": "integer", "nullable": true})),
            json!(0)
        );
        assert_eq!(instance(&json!({"type": ["null"]})), Value::Null);
        assert_eq!(instance(&json!({"type": "null"})), Value::Null);
    }

    #[test]
    fn objects_get_every_property_and_no_additional_ones() {
        let s = json!({"type": "object", "additionalProperties": {"type": "integer"},
                       "properties": {"z": {"type": "boolean"}, "a": {"type": "string"}},
                       "required": ["z", "extra"]});
        assert_eq!(
            instance(&s),
            json!({"a": format!("a: {WORDS}"), "z": true, "extra": 0})
        );
        assert_eq!(instance(&json!({"type": "object"})), json!({}));
    }

    #[test]
    fn arrays_have_min_items_or_three_and_index_their_items() {
        let s = json!({"type": "array", "items": {"type": "string"}});
        assert_eq!(
            instance(&s),
            json!([
                format!("item 0: {WORDS}"),
                format!("item 1: {WORDS}"),
                format!("item 2: {WORDS}")
            ])
        );
        let s = json!({"type": "array", "items": {"type": "integer"}, "minItems": 5});
        assert_eq!(instance(&s), json!([0, 0, 0, 0, 0]));
        let s = json!({"type": "array", "items": {"type": "integer"}, "maxItems": 2});
        assert_eq!(instance(&s), json!([0, 0]));
        let s = json!({"type": "array", "maxItems": 0});
        assert_eq!(instance(&s), json!([]));
        // Objects in an array: their properties carry the item's index.
        let s = json!({"type": "array", "items": {"type": "object",
                       "properties": {"description": {"type": "string"}}}});
        assert_eq!(
            instance(&s)[2]["description"],
            json!(format!("description 2: {WORDS}"))
        );
        // Tuples.
        let s = json!({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}],
                       "items": false});
        assert_eq!(instance(&s), json!([0, true]));
    }

    #[test]
    fn unique_items_are_distinct() {
        let s = json!({"type": "array", "uniqueItems": true, "items": {"type": "integer", "minimum": 10}});
        assert_eq!(instance(&s), json!([10, 11, 12]));
        let s = json!({"type": "array", "uniqueItems": true, "minItems": 4,
                       "items": {"type": "integer", "multipleOf": 5, "minimum": 1}});
        assert_eq!(instance(&s), json!([5, 10, 15, 20]));
        let s = json!({"type": "array", "uniqueItems": true, "items": {"enum": ["a", "b"]}});
        assert_eq!(instance(&s), json!(["a", "b"]));
        let s = json!({"type": "array", "uniqueItems": true, "items": {"type": "string", "format": "email"}});
        assert_eq!(
            instance(&s),
            json!(["mock@example.com", "mock1@example.com", "mock2@example.com"])
        );
        let s = json!({"type": "array", "uniqueItems": true, "items": {"type": "boolean"}});
        assert_eq!(instance(&s), json!([true, false]));
    }

    #[test]
    fn integers_start_at_the_lower_bound() {
        let i = |s: Value| instance(&s);
        assert_eq!(i(json!({"type": "integer"})), json!(0));
        assert_eq!(i(json!({"type": "integer", "minimum": 7})), json!(7));
        assert_eq!(i(json!({"type": "integer", "minimum": 2.5})), json!(3));
        assert_eq!(
            i(json!({"type": "integer", "exclusiveMinimum": 7})),
            json!(8)
        );
        assert_eq!(
            i(json!({"type": "integer", "minimum": 7, "exclusiveMinimum": true})),
            json!(8)
        );
        assert_eq!(i(json!({"type": "integer", "maximum": -4})), json!(-4));
        assert_eq!(
            i(json!({"type": "integer", "exclusiveMaximum": -4})),
            json!(-5)
        );
        assert_eq!(i(json!({"type": "integer", "maximum": 10})), json!(0));
        assert_eq!(
            i(json!({"type": "integer", "minimum": 3, "multipleOf": 4})),
            json!(4)
        );
        assert_eq!(
            i(json!({"type": "integer", "minimum": 3, "maximum": 5, "multipleOf": 4})),
            json!(4)
        );
        assert_eq!(
            i(json!({"type": "integer", "maximum": -3, "multipleOf": 2})),
            json!(-4)
        );
    }

    #[test]
    fn numbers_take_the_midpoint_or_a_bound_or_a_half() {
        let i = |s: Value| instance(&s);
        assert_eq!(i(json!({"type": "number"})), json!(0.5));
        assert_eq!(
            i(json!({"type": "number", "minimum": 1, "maximum": 4})),
            json!(2.5)
        );
        assert_eq!(
            i(json!({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1})),
            json!(0.5)
        );
        assert_eq!(i(json!({"type": "number", "minimum": 2})), json!(2.0));
        assert_eq!(
            i(json!({"type": "number", "exclusiveMinimum": 2})),
            json!(3.0)
        );
        assert_eq!(i(json!({"type": "number", "maximum": -2})), json!(-2.0));
        assert_eq!(
            i(json!({"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.2})),
            json!(0.6)
        );
        assert_eq!(i(json!({"minimum": 1, "maximum": 2})), json!(1.5));
    }

    #[test]
    fn booleans_are_true() {
        assert_eq!(instance(&json!({"type": "boolean"})), json!(true));
    }

    #[test]
    fn strings_name_their_place_and_respect_lengths() {
        assert_eq!(
            instance(&json!({"type": "string"})),
            json!(format!("answer: {WORDS}"))
        );
        let v = instance(
            &json!({"type": "object", "properties": {"summary": {"type": "string", "minLength": 60}}}),
        );
        let s = v["summary"].as_str().unwrap();
        assert_eq!(s, format!("summary: {WORDS} This is a mock answer"));
        assert!(s.chars().count() >= 60);
        let v = instance(&json!({"type": "string", "maxLength": 10}));
        assert_eq!(v, json!("answer: Th"));
        let v = instance(&json!({"type": "string", "minLength": 5, "maxLength": 5}));
        assert_eq!(v, json!("answe"));
    }

    #[test]
    fn strings_follow_their_format() {
        for (format, want) in [
            ("date-time", "2025-01-01T00:00:00Z"),
            ("date", "2025-01-01"),
            ("time", "00:00:00Z"),
            ("email", "mock@example.com"),
            ("uri", "https://example.com/mock"),
            ("url", "https://example.com/mock"),
            ("uuid", "00000000-0000-4000-8000-000000000000"),
            ("hostname", "example.com"),
            ("ipv4", "192.0.2.1"),
            ("ipv6", "2001:db8::1"),
            ("duration", "PT1S"),
        ] {
            let s = json!({"type": "string", "format": format});
            let v = instance(&s);
            assert_eq!(v, json!(want), "{format}");
            assert_valid(&s, &v);
        }
        // Unknown formats fall through to the plain rule.
        assert_eq!(
            instance(&json!({"type": "string", "format": "color"})),
            json!(format!("answer: {WORDS}"))
        );
    }

    #[test]
    fn strings_follow_simple_patterns_and_fall_back_to_a_fixed_string() {
        for (pattern, want) in [
            (r"^\d{3}-\d{4}$", "000-0000"),
            ("^[A-Z][a-z]+$", "Aa"),
            ("^(foo|bar)baz?$", "fooba"),
            ("^[^a-z]{2}$", "AA"),
            (r"^(?:v\d+\.)+\d*$", "v0."),
            ("^(?<year>[0-9]{4})-Q[1-4]$", "0000-Q1"),
            ("abc", "abc"),
            ("^$", ""),
            (r"^\w+@\w+\.com$", "a@a.com"),
        ] {
            let s = json!({"type": "string", "pattern": pattern});
            let v = instance(&s);
            assert_eq!(v, json!(want), "{pattern}");
            assert_valid(&s, &v);
        }
        for pattern in [r"^(?=a)\w+$", r"^(a)\1$", r"\bword\b", r"^\p{L}+$", "[a-"] {
            assert_eq!(
                instance(&json!({"type": "string", "pattern": pattern})),
                json!("mock"),
                "{pattern}"
            );
        }
    }

    #[test]
    fn unrecognised_schemas_give_null_when_allowed_else_an_empty_object() {
        assert_eq!(instance(&json!({})), Value::Null);
        assert_eq!(instance(&json!(true)), Value::Null);
        assert_eq!(instance(&json!({"description": "anything"})), Value::Null);
        let s = json!({"not": {"type": "null"}});
        assert_eq!(instance(&s), json!({}));
        assert_valid(&s, &instance(&s));
        assert_eq!(instance(&json!({"type": "whatever"})), json!({}));
    }

    #[test]
    fn the_same_schema_gives_the_same_value() {
        let s = json!({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "number"}}}});
        assert_eq!(instance(&s), instance(&s));
    }

    /// Varied schemas, each of whose instances the `jsonschema` crate accepts.
    #[test]
    fn instances_of_varied_schemas_validate() {
        let schemas = [
            json!({"type": "string"}),
            json!({"type": "integer", "minimum": -5, "maximum": -1}),
            json!({"type": "number", "exclusiveMinimum": 0, "maximum": 0.001}),
            json!({"type": "number", "minimum": 10, "multipleOf": 3}),
            json!({"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 5}),
            json!({"type": "boolean"}),
            json!({"type": "null"}),
            json!({"enum": [3, "x", null]}),
            json!({"const": {"a": [1, 2]}}),
            json!({"type": ["string", "null"], "minLength": 100, "maxLength": 120}),
            json!({"type": "string", "minLength": 3, "maxLength": 3}),
            json!({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2, "uniqueItems": true}),
            json!({"type": "array", "items": {"type": "string", "maxLength": 1}, "uniqueItems": true, "maxItems": 1}),
            json!({"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 10}, "uniqueItems": true}),
            json!({"type": "array", "items": {"type": "string", "format": "uuid"}, "uniqueItems": true, "minItems": 5}),
            json!({"type": "array", "items": {"type": "string", "format": "date-time"}, "uniqueItems": true}),
            json!({"type": "array", "items": {"type": "string", "format": "date"}, "uniqueItems": true}),
            json!({"type": "array", "items": {"type": "string", "format": "uri"}, "uniqueItems": true}),
            json!({"$schema": "http://json-schema.org/draft-07/schema#", "type": "array",
                   "items": [{"type": "string"}, {"type": "integer"}], "additionalItems": false}),
            json!({"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                   "who": {"type": "string", "format": "email"}, "site": {"type": "string", "format": "url"}},
                   "required": ["when", "who"], "additionalProperties": false}),
            json!({"type": "object", "properties": {"level": {"enum": ["low", "mid", "high"]},
                   "score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["level", "score"]}),
            // A research plan, as a pydantic model with nested models gives it.
            json!({
                "$defs": {
                    "Step": {"type": "object", "title": "Step", "additionalProperties": false,
                        "properties": {
                            "id": {"type": "integer", "minimum": 1},
                            "description": {"type": "string", "minLength": 10},
                            "sources": {"type": "array", "items": {"type": "string", "format": "uri"}, "maxItems": 5},
                            "depends_on": {"type": "array", "items": {"type": "integer"}, "uniqueItems": true},
                            "priority": {"$ref": "#/$defs/Priority"},
                            "estimate_hours": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]}
                        },
                        "required": ["id", "description", "sources", "depends_on", "priority", "estimate_hours"]},
                    "Priority": {"type": "string", "enum": ["high", "medium", "low"]}
                },
                "type": "object", "title": "Plan", "additionalProperties": false,
                "properties": {
                    "goal": {"type": "string"},
                    "steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}, "minItems": 1},
                    "created": {"type": "string", "format": "date"}
                },
                "required": ["goal", "steps", "created"]
            }),
            json!({"allOf": [{"$ref": "#/definitions/Base"}, {"properties": {"extra": {"type": "boolean"}}, "required": ["extra"]}],
                   "definitions": {"Base": {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]}}}),
            json!({"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
                             {"type": "object", "properties": {"kind": {"const": "b"}}, "required": ["kind"]}]}),
            json!({"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array",
                   "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2}}}}),
            json!({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}}}),
            json!({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                   "uniqueItems": true, "minItems": 4, "maxItems": 8}}, "required": ["tags"]}),
            json!({"type": "object", "properties": {"nested": {"type": "object", "properties": {"deeper":
                   {"type": "object", "properties": {"value": {"type": ["integer", "null"], "maximum": -10}}}}}}}),
            json!({"$defs": {"Tree": {"type": "object", "properties": {"label": {"type": "string"},
                   "kids": {"type": "array", "items": {"$ref": "#/$defs/Tree"}}}, "required": ["label", "kids"]}},
                   "type": "object", "properties": {"root": {"$ref": "#/$defs/Tree"}}, "required": ["root"]}),
            json!({"type": "object", "properties": {"t": {"type": "string", "format": "time"},
                   "host": {"type": "string", "format": "hostname"}, "ip": {"type": "string", "format": "ipv4"},
                   "ip6": {"type": "string", "format": "ipv6"}, "d": {"type": "string", "format": "duration"}}}),
            json!({"type": "array", "prefixItems": [{"const": 1}, {"type": "string"}], "items": false, "minItems": 2}),
            json!({"type": "object", "properties": {"ratio": {"type": "number", "minimum": 0.25, "maximum": 0.75, "multipleOf": 0.25}}}),
        ];
        assert!(schemas.len() >= 30, "{}", schemas.len());
        for s in &schemas {
            let v = instance(s);
            assert_valid(s, &v);
        }
    }
}
