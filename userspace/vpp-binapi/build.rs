//! Generates Rust types for every message, type, union, enum, enumflags and alias of the
//! vendored VPP `.api.json` files (api/), with their wire encoding (see src/wire.rs) and a
//! registry of every message (name, CRC, header shape, service relations).
//!
//! The JSON backend of vppapigen makes every file self-contained: a type used by several
//! files appears in each of them. Types are therefore generated once, in `api::types`, after
//! checking that every copy has the same definition; messages go into one module per file.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One `.api.json` file.
struct ApiFile {
    /// File stem without `.api` (e.g. `interface`).
    module: String,
    crc: u32,
    version: String,
    messages: Vec<Value>,
    services: serde_json::Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq)]
enum Shape {
    Scalar,
    FixedArray(usize),
    FixedString(usize),
    VarString,
    VarArray(String),
}

#[derive(Clone, Debug)]
struct Field {
    ty: String,
    name: String,
    shape: Shape,
    default: Option<Value>,
}

#[derive(Clone, Debug)]
enum Def {
    Struct(Vec<Field>),
    Union(Vec<Field>),
    Enum { repr: String, symbols: Vec<(String, i64)>, flags: bool },
    Alias { ty: String, length: Option<usize> },
}

const BASE: &[(&str, &str, usize)] = &[
    ("u8", "u8", 1),
    ("u16", "u16", 2),
    ("u32", "u32", 4),
    ("u64", "u64", 8),
    ("i8", "i8", 1),
    ("i16", "i16", 2),
    ("i32", "i32", 4),
    ("i64", "i64", 8),
    ("f64", "f64", 8),
    ("bool", "bool", 1),
];

const KEYWORDS: &[&str] = &[
    "as", "break", "const", "continue", "else", "enum", "extern", "false", "fn", "for", "if", "impl", "in", "let",
    "loop", "match", "mod", "move", "mut", "pub", "ref", "return", "static", "struct", "trait", "true", "type",
    "unsafe", "use", "where", "while", "async", "await", "dyn", "abstract", "become", "box", "do", "final", "macro",
    "override", "priv", "typeof", "unsized", "virtual", "yield", "try", "gen",
];

fn ident(name: &str) -> String {
    // `self`, `Self`, `super` and `crate` cannot be raw identifiers; no VPP field uses them.
    assert!(!["self", "Self", "super", "crate"].contains(&name), "field name {name} cannot be a Rust identifier");
    if KEYWORDS.contains(&name) { format!("r#{name}") } else { name.to_owned() }
}

fn camel(name: &str) -> String {
    name.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// `vl_api_foo_t` -> `foo`; base types unchanged.
fn strip_type(t: &str) -> String {
    t.strip_prefix("vl_api_").and_then(|s| s.strip_suffix("_t")).unwrap_or(t).to_owned()
}

fn base(t: &str) -> Option<(&'static str, usize)> {
    BASE.iter().find(|(n, _, _)| *n == t).map(|(_, r, s)| (*r, *s))
}

fn parse_field(v: &Value, ctx: &str) -> Result<Field> {
    let a = v.as_array().with_context(|| format!("{ctx}: field is not an array: {v}"))?;
    let ty = a.first().and_then(Value::as_str).with_context(|| format!("{ctx}: field type"))?;
    let name = a.get(1).and_then(Value::as_str).with_context(|| format!("{ctx}: field name"))?.to_owned();
    let mut len: Option<usize> = None;
    let mut lenfield: Option<String> = None;
    let mut default = None;
    for extra in &a[2..] {
        match extra {
            Value::Number(n) => len = Some(n.as_u64().context("array length")? as usize),
            Value::String(s) => lenfield = Some(s.clone()),
            Value::Object(o) => default = o.get("default").cloned(),
            other => bail!("{ctx}.{name}: unexpected field option {other}"),
        }
    }
    let ty = strip_type(ty);
    let shape = match (ty.as_str(), len, lenfield) {
        ("string", Some(0), None) => Shape::VarString,
        ("string", Some(n), None) => Shape::FixedString(n),
        ("string", None, None) => Shape::VarString,
        (_, Some(0), Some(f)) => Shape::VarArray(f),
        (_, Some(n), None) if n > 0 => Shape::FixedArray(n),
        (_, None, None) => Shape::Scalar,
        (t, l, f) => bail!("{ctx}.{name}: unsupported field shape {t} len {l:?} lenfield {f:?}"),
    };
    Ok(Field { ty, name, shape, default })
}

struct Gen {
    defs: BTreeMap<String, Def>,
    files: Vec<ApiFile>,
}

impl Gen {
    fn load(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<Vec<PathBuf>>>()?
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".api.json"))
            .collect();
        paths.sort();
        let mut defs: BTreeMap<String, (Def, String, String)> = BTreeMap::new();
        let mut files = Vec::new();
        for path in &paths {
            println!("cargo:rerun-if-changed={}", path.display());
            let text = std::fs::read_to_string(path)?;
            let j: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            let fname = path.file_name().unwrap().to_string_lossy().into_owned();
            let module = fname.trim_end_matches(".api.json").to_owned();
            let mut add = |name: String, def: Def, raw: String| -> Result<()> {
                if let Some((_, prev_raw, prev_file)) = defs.get(&name) {
                    if *prev_raw != raw {
                        bail!("type {name} differs between {prev_file} and {fname}");
                    }
                    return Ok(());
                }
                defs.insert(name, (def, raw, fname.clone()));
                Ok(())
            };
            for (kind, is_union) in [("types", false), ("unions", true)] {
                for t in j[kind].as_array().into_iter().flatten() {
                    let a = t.as_array().context("type entry")?;
                    let name = a[0].as_str().context("type name")?.to_owned();
                    let fields = a[1..]
                        .iter()
                        .filter(|f| f.is_array())
                        .map(|f| parse_field(f, &name))
                        .collect::<Result<Vec<_>>>()?;
                    let def = if is_union { Def::Union(fields) } else { Def::Struct(fields) };
                    add(name, def, t.to_string())?;
                }
            }
            for (kind, flags) in [("enums", false), ("enumflags", true)] {
                for t in j[kind].as_array().into_iter().flatten() {
                    let a = t.as_array().context("enum entry")?;
                    let name = a[0].as_str().context("enum name")?.to_owned();
                    let mut symbols = vec![];
                    let mut repr = "u32".to_owned();
                    for e in &a[1..] {
                        match e {
                            Value::Array(s) => symbols.push((
                                s[0].as_str().context("enum symbol")?.to_owned(),
                                s[1].as_i64().context("enum value")?,
                            )),
                            Value::Object(o) => {
                                if let Some(r) = o.get("enumtype").and_then(Value::as_str) {
                                    repr = r.to_owned();
                                }
                            }
                            other => bail!("enum {name}: unexpected {other}"),
                        }
                    }
                    if !matches!(repr.as_str(), "u8" | "u16" | "u32" | "i8" | "i16" | "i32") {
                        bail!("enum {name}: unsupported enumtype {repr}");
                    }
                    add(name, Def::Enum { repr, symbols, flags }, t.to_string())?;
                }
            }
            for (name, v) in j["aliases"].as_object().into_iter().flatten() {
                let ty = strip_type(v["type"].as_str().context("alias type")?);
                let length = v.get("length").and_then(Value::as_u64).map(|n| n as usize);
                add(name.clone(), Def::Alias { ty, length }, v.to_string())?;
            }
            let crc_text = j["vl_api_version"].as_str().context("vl_api_version")?;
            files.push(ApiFile {
                module,
                crc: u32::from_str_radix(crc_text.trim_start_matches("0x"), 16)?,
                version: j["options"]["version"].as_str().unwrap_or("").to_owned(),
                messages: j["messages"].as_array().cloned().unwrap_or_default(),
                services: j["services"].as_object().cloned().unwrap_or_default(),
            });
        }
        // memclnt is numbered first by VPP (its IDs 15/16 are fixed); the rest by name.
        files.sort_by_key(|f| (f.module != "memclnt", f.module.clone()));
        Ok(Self { defs: defs.into_iter().map(|(k, (d, _, _))| (k, d)).collect(), files })
    }

    /// Rust type of a field's element type (no array wrapper).
    fn rust_elem(&self, ty: &str) -> Result<String> {
        if let Some((r, _)) = base(ty) {
            return Ok(r.to_owned());
        }
        if self.defs.contains_key(ty) {
            return Ok(camel(ty));
        }
        bail!("unknown type {ty}")
    }

    fn rust_field_type(&self, f: &Field) -> Result<String> {
        Ok(match &f.shape {
            Shape::Scalar => self.rust_elem(&f.ty)?,
            Shape::FixedArray(n) => format!("[{}; {n}]", self.rust_elem(&f.ty)?),
            Shape::FixedString(_) | Shape::VarString => "::std::string::String".to_owned(),
            Shape::VarArray(_) => format!("::std::vec::Vec<{}>", self.rust_elem(&f.ty)?),
        })
    }

    /// Encoded size of a type (its fixed part: a variable string counts its length prefix,
    /// a variable array nothing).
    fn size_of(&self, ty: &str) -> Result<usize> {
        if ty == "string" {
            bail!("bare string type");
        }
        if let Some((_, s)) = base(ty) {
            return Ok(s);
        }
        match self.defs.get(ty).with_context(|| format!("unknown type {ty}"))? {
            Def::Struct(fields) => self.fields_size(fields),
            Def::Union(arms) => {
                let mut max = 0;
                for a in arms {
                    max = max.max(self.field_size(a)?);
                }
                Ok(max)
            }
            Def::Enum { repr, .. } => Ok(base(repr).map(|(_, s)| s).unwrap_or(4)),
            Def::Alias { ty, length } => Ok(self.size_of(ty)? * length.unwrap_or(1)),
        }
    }

    fn field_size(&self, f: &Field) -> Result<usize> {
        Ok(match &f.shape {
            Shape::Scalar => self.size_of(&f.ty)?,
            Shape::FixedArray(n) => self.size_of(&f.ty)? * n,
            Shape::FixedString(n) => *n,
            Shape::VarString => 4,
            Shape::VarArray(_) => 0,
        })
    }

    fn fields_size(&self, fields: &[Field]) -> Result<usize> {
        fields.iter().map(|f| self.field_size(f)).sum()
    }

    /// Whether a value of this type can only be encoded with variable length.
    fn is_variable(&self, ty: &str) -> bool {
        match self.defs.get(ty) {
            Some(Def::Struct(fields)) | Some(Def::Union(fields)) => fields.iter().any(|f| {
                matches!(f.shape, Shape::VarString | Shape::VarArray(_))
                    || (!matches!(f.shape, Shape::FixedString(_)) && self.is_variable(&f.ty))
            }),
            Some(Def::Alias { ty, .. }) => self.is_variable(ty),
            _ => false,
        }
    }

    fn has_string(&self, ty: &str) -> bool {
        match self.defs.get(ty) {
            Some(Def::Struct(fields)) | Some(Def::Union(fields)) => fields
                .iter()
                .any(|f| matches!(f.shape, Shape::FixedString(_) | Shape::VarString) || self.has_string(&f.ty)),
            Some(Def::Alias { ty, .. }) => self.has_string(ty),
            _ => false,
        }
    }

    fn has_float(&self, ty: &str) -> bool {
        if ty == "f64" {
            return true;
        }
        match self.defs.get(ty) {
            Some(Def::Struct(fields)) | Some(Def::Union(fields)) => fields.iter().any(|f| self.has_float(&f.ty)),
            Some(Def::Alias { ty, .. }) => self.has_float(ty),
            _ => false,
        }
    }

    /// Whether the field's Rust type is a fixed array (directly or through an alias), which
    /// needs the array serde helper.
    fn is_array_typed(&self, f: &Field) -> bool {
        match f.shape {
            Shape::FixedArray(_) => true,
            Shape::Scalar => self.alias_is_array(&f.ty),
            _ => false,
        }
    }

    fn alias_is_array(&self, ty: &str) -> bool {
        match self.defs.get(ty) {
            Some(Def::Alias { length: Some(_), .. }) => true,
            Some(Def::Alias { ty, length: None }) => self.alias_is_array(ty),
            _ => false,
        }
    }

    /// The Rust expression for a field's default value.
    fn default_expr(&self, f: &Field) -> Result<String> {
        if let (Shape::Scalar, Some(d)) = (&f.shape, &f.default)
            && let Some(e) = self.literal_default(&f.ty, d)
        {
            return Ok(e);
        }
        Ok(match &f.shape {
            Shape::FixedArray(_) => "::std::array::from_fn(|_| ::std::default::Default::default())".to_owned(),
            Shape::Scalar if self.alias_is_array(&f.ty) => {
                "::std::array::from_fn(|_| ::std::default::Default::default())".to_owned()
            }
            _ => "::std::default::Default::default()".to_owned(),
        })
    }

    /// A client-side default from the JSON, when it fits the field's type.
    fn literal_default(&self, ty: &str, d: &Value) -> Option<String> {
        let resolved = self.resolve_alias(ty);
        match (resolved.as_str(), d) {
            ("bool", Value::Bool(b)) => Some(b.to_string()),
            ("bool", Value::String(s)) if s == "true" || s == "false" => Some(s.clone()),
            ("f64", Value::Number(n)) => n.as_f64().map(|x| format!("{x:?}")),
            (t, Value::Number(n)) if base(t).is_some() && t != "f64" && t != "bool" => {
                let v = n.as_i64()?;
                let fits = match t {
                    "u8" => u8::try_from(v).is_ok(),
                    "u16" => u16::try_from(v).is_ok(),
                    "u32" => u32::try_from(v).is_ok(),
                    "u64" => v >= 0,
                    "i8" => i8::try_from(v).is_ok(),
                    "i16" => i16::try_from(v).is_ok(),
                    "i32" => i32::try_from(v).is_ok(),
                    _ => true,
                };
                fits.then(|| format!("{v}"))
            }
            (t, Value::Number(n)) => match self.defs.get(t) {
                Some(Def::Enum { .. }) => n.as_i64().map(|v| format!("{}({v})", camel(t))),
                _ => None,
            },
            _ => None,
        }
    }

    fn resolve_alias(&self, ty: &str) -> String {
        match self.defs.get(ty) {
            Some(Def::Alias { ty: t, length: None }) => self.resolve_alias(t),
            _ => ty.to_owned(),
        }
    }

    // === code generation ===

    fn derives(&self, name: &str, extra_eq: bool) -> String {
        let eq = if extra_eq && !self.has_float(name) { ", Eq, Hash" } else { "" };
        format!("#[derive(Clone, Debug, PartialEq{eq}, ::serde::Serialize, ::serde::Deserialize)]\n")
    }

    fn gen_struct(&self, out: &mut String, rust: &str, vpp_name: &str, fields: &[Field], is_type: bool) -> Result<()> {
        let derives = if is_type {
            self.derives(vpp_name, true)
        } else {
            let eq = if fields.iter().any(|f| self.has_float(&f.ty)) { "" } else { ", Eq, Hash" };
            format!("#[derive(Clone, Debug, PartialEq{eq}, ::serde::Serialize, ::serde::Deserialize)]\n")
        };
        writeln!(out, "/// VPP `{vpp_name}`.")?;
        out.push_str(&derives);
        writeln!(out, "#[serde(default)]")?;
        writeln!(out, "pub struct {rust} {{")?;
        for f in fields {
            if self.is_array_typed(f) {
                writeln!(out, "    #[serde(with = \"crate::wire::serde_array\")]")?;
            }
            if let Shape::VarArray(count) = &f.shape {
                writeln!(out, "    /// Its length is written in `{count}` on the wire.")?;
            }
            writeln!(out, "    pub {}: {},", ident(&f.name), self.rust_field_type(f)?)?;
        }
        writeln!(out, "}}\n")?;

        writeln!(out, "impl ::std::default::Default for {rust} {{")?;
        writeln!(out, "    fn default() -> Self {{")?;
        writeln!(out, "        Self {{")?;
        for f in fields {
            writeln!(out, "            {}: {},", ident(&f.name), self.default_expr(f)?)?;
        }
        writeln!(out, "        }}\n    }}\n}}\n")?;

        // Every count field must come before its array and belong to the same struct.
        let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        for (i, f) in fields.iter().enumerate() {
            if let Shape::VarArray(count) = &f.shape {
                let pos = names.iter().position(|n| n == count);
                match pos {
                    Some(p) if p < i => {}
                    _ => bail!("{vpp_name}.{}: count field {count} not found before it", f.name),
                }
            }
        }

        writeln!(out, "impl crate::wire::Wire for {rust} {{")?;
        writeln!(
            out,
            "    #[allow(unused_variables)]\n    fn encode(&self, out: &mut ::std::vec::Vec<u8>) -> Result<(), crate::wire::EncodeError> {{"
        )?;
        for f in fields {
            let id = ident(&f.name);
            let fname = format!("{vpp_name}.{}", f.name);
            match &f.shape {
                Shape::Scalar | Shape::FixedArray(_) => {
                    // The count of a variable array must match the array.
                    let arrays: Vec<&Field> =
                        fields.iter().filter(|a| matches!(&a.shape, Shape::VarArray(c) if *c == f.name)).collect();
                    for a in arrays {
                        writeln!(
                            out,
                            "        crate::wire::check_count(\"{vpp_name}.{}\", \"{}\", self.{} as u64, self.{}.len())?;",
                            a.name,
                            f.name,
                            id,
                            ident(&a.name)
                        )?;
                    }
                    writeln!(out, "        crate::wire::Wire::encode(&self.{id}, out)?;")?;
                }
                Shape::FixedString(n) => {
                    writeln!(out, "        crate::wire::put_fixed_string(out, &self.{id}, {n}, \"{fname}\")?;")?;
                }
                Shape::VarString => {
                    writeln!(out, "        crate::wire::put_var_string(out, &self.{id}, \"{fname}\")?;")?;
                }
                Shape::VarArray(_) => {
                    writeln!(out, "        for x in &self.{id} {{ crate::wire::Wire::encode(x, out)?; }}")?;
                }
            }
        }
        writeln!(out, "        Ok(())\n    }}")?;
        writeln!(
            out,
            "    #[allow(unused_variables)]\n    fn decode(r: &mut crate::wire::Reader<'_>) -> Result<Self, crate::wire::DecodeError> {{"
        )?;
        for f in fields {
            let var = format!("f_{}", f.name);
            let fname = format!("{vpp_name}.{}", f.name);
            match &f.shape {
                Shape::Scalar | Shape::FixedArray(_) => {
                    writeln!(out, "        let {var}: {} = crate::wire::Wire::decode(r)?;", self.rust_field_type(f)?)?;
                }
                Shape::FixedString(n) => {
                    writeln!(out, "        let {var} = r.fixed_string({n}, \"{fname}\")?;")?;
                }
                Shape::VarString => {
                    writeln!(out, "        let {var} = r.var_string(\"{fname}\")?;")?;
                }
                Shape::VarArray(count) => {
                    let min = self.size_of(&f.ty)?.max(1);
                    writeln!(out, "        let {var} = r.array(f_{count} as u64, {min}, \"{fname}\")?;")?;
                }
            }
        }
        write!(out, "        Ok(Self {{")?;
        for f in fields {
            write!(out, " {}: f_{},", ident(&f.name), f.name)?;
        }
        writeln!(out, " }})\n    }}\n}}\n")?;
        Ok(())
    }

    fn gen_union(&self, out: &mut String, vpp_name: &str, arms: &[Field]) -> Result<()> {
        let rust = camel(vpp_name);
        let size = self.size_of(vpp_name)?;
        for a in arms {
            if a.shape != Shape::Scalar && !matches!(a.shape, Shape::FixedArray(_))
                || self.is_variable(&a.ty)
                || self.has_string(&a.ty)
            {
                bail!("union {vpp_name}: arm {} is not plain fixed-size data (unsupported)", a.name);
            }
        }
        let eq = if self.has_float(vpp_name) { "" } else { ", Eq, Hash" };
        writeln!(
            out,
            "/// VPP union `{vpp_name}`: {size} bytes holding one of its arms (zero-padded); which arm\n\
             /// is in use is told by a field outside the union."
        )?;
        writeln!(out, "#[derive(Clone, Copy, PartialEq{eq})]")?;
        writeln!(out, "pub struct {rust}(pub [u8; {size}]);\n")?;
        writeln!(out, "impl ::std::default::Default for {rust} {{ fn default() -> Self {{ Self([0; {size}]) }} }}\n")?;
        writeln!(out, "impl ::std::fmt::Debug for {rust} {{")?;
        writeln!(
            out,
            "    fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {{ write!(f, \"{rust}({{:02x?}})\", &self.0[..]) }}\n}}\n"
        )?;
        writeln!(out, "impl {rust} {{")?;
        writeln!(out, "    /// Encoded size.\n    pub const SIZE: usize = {size};")?;
        for a in arms {
            let ty = self.rust_field_type(a)?;
            let id = ident(&a.name);
            writeln!(out, "    /// The union holding arm `{}`.", a.name)?;
            writeln!(out, "    pub fn from_{}(v: &{ty}) -> Self {{ Self(crate::wire::union_bytes(v)) }}", a.name)?;
            writeln!(out, "    /// Reads the bytes as arm `{}`.", a.name)?;
            writeln!(out, "    pub fn {id}(&self) -> {ty} {{ crate::wire::union_arm(&self.0) }}")?;
        }
        writeln!(out, "}}\n")?;
        writeln!(out, "impl crate::wire::Wire for {rust} {{")?;
        writeln!(
            out,
            "    fn encode(&self, out: &mut ::std::vec::Vec<u8>) -> Result<(), crate::wire::EncodeError> {{ out.extend_from_slice(&self.0); Ok(()) }}"
        )?;
        writeln!(
            out,
            "    fn decode(r: &mut crate::wire::Reader<'_>) -> Result<Self, crate::wire::DecodeError> {{ Ok(Self(r.array_bytes::<{size}>(\"{vpp_name}\")?)) }}\n}}\n"
        )?;
        // serde: `{arm: value}` (as vpp_papi takes it) or `{"raw": [bytes]}`; serialised raw.
        writeln!(out, "#[derive(::serde::Serialize, ::serde::Deserialize)]")?;
        writeln!(out, "enum {rust}Repr {{")?;
        for a in arms {
            if self.is_array_typed(a) {
                writeln!(
                    out,
                    "    #[serde(rename = \"{}\", with = \"crate::wire::serde_array\")] {}({}),",
                    a.name,
                    camel(&a.name),
                    self.rust_field_type(a)?
                )?;
            } else {
                writeln!(
                    out,
                    "    #[serde(rename = \"{}\")] {}({}),",
                    a.name,
                    camel(&a.name),
                    self.rust_field_type(a)?
                )?;
            }
        }
        writeln!(out, "    #[serde(rename = \"raw\")] Raw(::std::vec::Vec<u8>),\n}}\n")?;
        writeln!(out, "impl ::serde::Serialize for {rust} {{")?;
        writeln!(
            out,
            "    fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {{ ::serde::Serialize::serialize(&{rust}Repr::Raw(self.0.to_vec()), s) }}\n}}\n"
        )?;
        writeln!(out, "impl<'de> ::serde::Deserialize<'de> for {rust} {{")?;
        writeln!(out, "    fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {{")?;
        writeln!(out, "        Ok(match <{rust}Repr as ::serde::Deserialize>::deserialize(d)? {{")?;
        for a in arms {
            writeln!(out, "            {rust}Repr::{}(v) => Self::from_{}(&v),", camel(&a.name), a.name)?;
        }
        writeln!(out, "            {rust}Repr::Raw(v) => {{")?;
        writeln!(
            out,
            "                if v.len() != {size} {{ return Err(<D::Error as ::serde::de::Error>::invalid_length(v.len(), &\"{size} bytes\")); }}"
        )?;
        writeln!(out, "                let mut b = [0u8; {size}]; b.copy_from_slice(&v); Self(b)\n            }}")?;
        writeln!(out, "        }})\n    }}\n}}\n")?;
        Ok(())
    }

    fn gen_enum(
        &self,
        out: &mut String,
        vpp_name: &str,
        repr: &str,
        symbols: &[(String, i64)],
        flags: bool,
    ) -> Result<()> {
        let rust = camel(vpp_name);
        let kind = if flags { "enumflags" } else { "enum" };
        writeln!(
            out,
            "/// VPP {kind} `{vpp_name}`, encoded as `{repr}`. Values outside the listed symbols are kept as they are."
        )?;
        writeln!(
            out,
            "#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, ::serde::Serialize, ::serde::Deserialize)]"
        )?;
        writeln!(out, "#[serde(transparent)]")?;
        writeln!(out, "pub struct {rust}(pub {repr});\n")?;
        writeln!(out, "#[allow(non_upper_case_globals)]\nimpl {rust} {{")?;
        for (s, v) in symbols {
            writeln!(out, "    pub const {s}: Self = Self({v});")?;
        }
        writeln!(out, "    /// Every symbol with its value.")?;
        write!(out, "    pub const SYMBOLS: &'static [(&'static str, Self)] = &[")?;
        for (s, _) in symbols {
            write!(out, "(\"{s}\", Self::{s}), ")?;
        }
        writeln!(out, "];")?;
        writeln!(
            out,
            "    /// The symbol of this exact value, if any.\n    pub fn symbol(self) -> Option<&'static str> {{ Self::SYMBOLS.iter().find(|(_, v)| *v == self).map(|(n, _)| *n) }}"
        )?;
        // Some files declare flag sets as plain enums: every enum gets the bit operations.
        {
            writeln!(
                out,
                "    /// Whether every bit of `other` is set.\n    pub fn contains(self, other: Self) -> bool {{ self.0 & other.0 == other.0 }}"
            )?;
        }
        writeln!(out, "}}\n")?;
        writeln!(out, "impl ::std::fmt::Debug for {rust} {{")?;
        writeln!(out, "    fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {{")?;
        writeln!(
            out,
            "        match self.symbol() {{ Some(s) => f.write_str(s), None => write!(f, \"{rust}({{}})\", self.0) }}\n    }}\n}}\n"
        )?;
        {
            writeln!(
                out,
                "impl ::std::ops::BitOr for {rust} {{ type Output = Self; fn bitor(self, o: Self) -> Self {{ Self(self.0 | o.0) }} }}\n"
            )?;
            writeln!(
                out,
                "impl ::std::ops::BitAnd for {rust} {{ type Output = Self; fn bitand(self, o: Self) -> Self {{ Self(self.0 & o.0) }} }}\n"
            )?;
        }
        writeln!(out, "impl crate::wire::Wire for {rust} {{")?;
        writeln!(
            out,
            "    fn encode(&self, out: &mut ::std::vec::Vec<u8>) -> Result<(), crate::wire::EncodeError> {{ crate::wire::Wire::encode(&self.0, out) }}"
        )?;
        writeln!(
            out,
            "    fn decode(r: &mut crate::wire::Reader<'_>) -> Result<Self, crate::wire::DecodeError> {{ Ok(Self(crate::wire::Wire::decode(r)?)) }}\n}}\n"
        )?;
        Ok(())
    }

    fn gen_types(&self, out: &mut String) -> Result<()> {
        writeln!(out, "/// Every type, union, enum, enumflags and alias of the shipped files (deduplicated).")?;
        writeln!(out, "pub mod types {{")?;
        writeln!(out, "#![allow(clippy::all, missing_docs)]")?;
        for (name, def) in &self.defs {
            match def {
                Def::Struct(fields) => self.gen_struct(out, &camel(name), name, fields, true)?,
                Def::Union(arms) => self.gen_union(out, name, arms)?,
                Def::Enum { repr, symbols, flags } => self.gen_enum(out, name, repr, symbols, *flags)?,
                Def::Alias { ty, length } => {
                    let elem = self.rust_elem(ty)?;
                    writeln!(out, "/// VPP alias `{name}`.")?;
                    match length {
                        Some(n) => writeln!(out, "pub type {} = [{elem}; {n}];\n", camel(name))?,
                        None => writeln!(out, "pub type {} = {elem};\n", camel(name))?,
                    }
                }
            }
        }
        writeln!(out, "}}\n")?;
        Ok(())
    }

    fn gen_messages(&self, out: &mut String, registry: &mut Vec<String>) -> Result<()> {
        for file in self.files.iter().filter(|f| !f.messages.is_empty()) {
            writeln!(out, "/// Messages of `{}.api` (version {}).", file.module, file.version)?;
            writeln!(out, "pub mod {} {{", file.module)?;
            writeln!(out, "#![allow(clippy::all, missing_docs, unused_imports)]")?;
            writeln!(out, "use super::types::*;\n")?;
            let mut by_name: BTreeMap<String, (Vec<Field>, bool, bool)> = BTreeMap::new();
            for (index, m) in file.messages.iter().enumerate() {
                let a = m.as_array().context("message")?;
                let name = a[0].as_str().context("message name")?.to_owned();
                let meta = a.last().and_then(Value::as_object).context("message metadata")?;
                let crc_text = meta["crc"].as_str().context("crc")?;
                let crc = u32::from_str_radix(crc_text.trim_start_matches("0x"), 16)?;
                let all: Vec<Field> = a[1..a.len() - 1]
                    .iter()
                    .filter(|f| f.is_array())
                    .map(|f| parse_field(f, &name))
                    .collect::<Result<_>>()?;
                // The header: `_vl_msg_id`, then `client_index` and/or `context` if they follow.
                let mut body = all.as_slice();
                if body.first().map(|f| f.name.as_str()) != Some("_vl_msg_id") {
                    bail!("{name}: first field is not _vl_msg_id");
                }
                body = &body[1..];
                let has_client_index = body.first().is_some_and(|f| f.name == "client_index");
                if has_client_index {
                    body = &body[1..];
                }
                let has_context = body.first().is_some_and(|f| f.name == "context");
                if has_context {
                    body = &body[1..];
                }
                let rust = camel(&name);
                self.gen_struct(out, &rust, &name, body, false)?;
                let header_len = 2 + 4 * (has_client_index as usize + has_context as usize);
                let mut retval_offset = None;
                let mut off = header_len;
                for f in body {
                    if f.name == "retval" && f.ty == "i32" {
                        retval_offset = Some(off);
                    }
                    off += self.field_size(f)?;
                }
                let fixed_size = off;
                let has_retval = body.iter().any(|f| f.name == "retval" && f.ty == "i32" && f.shape == Shape::Scalar);
                let service = file.services.get(&name);
                let reply = service.and_then(|s| s["reply"].as_str()).filter(|r| *r != "null");
                let stream = service.is_some_and(|s| s["stream"].as_bool() == Some(true));
                let stream_msg = service.and_then(|s| s.get("stream_msg")).and_then(Value::as_str);
                let events: Vec<&str> = service
                    .and_then(|s| s.get("events"))
                    .and_then(Value::as_array)
                    .map(|e| e.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let kind = match (reply, stream, stream_msg) {
                    (Some(_), true, Some(_)) => "Getter",
                    (Some(_), true, None) => "Dump",
                    (Some(_), false, _) => "Request",
                    _ => {
                        if !has_context {
                            "Event"
                        } else {
                            "Reply"
                        }
                    }
                };
                writeln!(out, "impl crate::message::Message for {rust} {{")?;
                writeln!(out, "    const NAME: &'static str = \"{name}\";")?;
                writeln!(out, "    const CRC: u32 = 0x{crc:08x};")?;
                writeln!(out, "    const NAME_CRC: &'static str = \"{name}_{crc:08x}\";")?;
                writeln!(out, "    const HAS_CLIENT_INDEX: bool = {has_client_index};")?;
                writeln!(out, "    const HAS_CONTEXT: bool = {has_context};")?;
                if has_retval {
                    writeln!(out, "    fn retval(&self) -> Option<i32> {{ Some(self.retval) }}")?;
                }
                writeln!(out, "}}\n")?;
                match (reply, stream, stream_msg) {
                    (Some(r), false, _) => {
                        writeln!(out, "impl crate::message::Request for {rust} {{ type Reply = {}; }}\n", camel(r))?;
                    }
                    (Some(d), true, None) => {
                        writeln!(out, "impl crate::message::Dump for {rust} {{ type Details = {}; }}\n", camel(d))?;
                    }
                    (Some(r), true, Some(d)) => {
                        let has_cursor = body.iter().any(|f| f.name == "cursor");
                        if has_cursor {
                            writeln!(out, "impl crate::message::Getter for {rust} {{")?;
                            writeln!(out, "    type Reply = {};\n    type Details = {};", camel(r), camel(d))?;
                            writeln!(
                                out,
                                "    fn set_cursor(&mut self, cursor: u32) {{ self.cursor = cursor; }}\n}}\n"
                            )?;
                        }
                    }
                    _ => {}
                }
                for e in &events {
                    writeln!(out, "impl crate::message::Subscribe<{}> for {rust} {{}}\n", camel(e))?;
                }
                by_name.insert(name.clone(), (body.to_vec(), has_client_index, has_context));
                registry.push(format!(
                    "MessageInfo {{ name: \"{name}\", crc: 0x{crc:08x}, name_crc: \"{name}_{crc:08x}\", module: \"{}\", index_in_module: {index}, has_client_index: {has_client_index}, has_context: {has_context}, fixed_size: {fixed_size}, retval_offset: {}, reply: {}, details: {}, kind: MessageKind::{kind} }}",
                    file.module,
                    match retval_offset {
                        Some(o) => format!("Some({o})"),
                        None => "None".into(),
                    },
                    match reply {
                        Some(r) if !stream || stream_msg.is_some() => format!("Some(\"{r}\")"),
                        _ => "None".into(),
                    },
                    match (stream, stream_msg, reply) {
                        (true, Some(d), _) => format!("Some(\"{d}\")"),
                        (true, None, Some(d)) => format!("Some(\"{d}\")"),
                        _ => "None".into(),
                    },
                ));
            }
            // Getter replies expose their cursor.
            for file_service in file.services.values() {
                if let (Some(r), Some(_)) = (file_service["reply"].as_str(), file_service.get("stream_msg"))
                    && let Some((fields, _, _)) = by_name.get(r)
                    && fields.iter().any(|f| f.name == "cursor")
                {
                    writeln!(
                        out,
                        "impl crate::message::CursorReply for {} {{ fn cursor(&self) -> u32 {{ self.cursor }} }}\n",
                        camel(r)
                    )?;
                }
            }
            writeln!(out, "}}\n")?;
        }
        Ok(())
    }

    fn visit_arms(&self) -> Result<Vec<(String, String)>> {
        let mut arms = Vec::new();
        for file in &self.files {
            for m in &file.messages {
                let a = m.as_array().context("message")?;
                let name = a[0].as_str().context("message name")?;
                let crc_text = a.last().and_then(|l| l["crc"].as_str()).context("crc")?;
                let crc = u32::from_str_radix(crc_text.trim_start_matches("0x"), 16)?;
                arms.push((format!("{name}_{crc:08x}"), format!("{}::{}", file.module, camel(name))));
            }
        }
        Ok(arms)
    }

    fn generate(&self) -> Result<String> {
        let mut out = String::new();
        writeln!(out, "// @generated by build.rs from api/*.api.json. Do not edit.\n")?;
        self.gen_types(&mut out)?;
        let mut registry = Vec::new();
        self.gen_messages(&mut out, &mut registry)?;
        for file in self.files.iter().filter(|f| !f.messages.is_empty()) {
            writeln!(out, "pub use {}::*;", file.module)?;
        }
        writeln!(out, "pub use types::*;\n")?;
        // The registry: every message in VPP numbering order (memclnt first, in file order).
        writeln!(out, "use crate::message::{{MessageInfo, MessageKind, ApiModule}};\n")?;
        writeln!(
            out,
            "/// Every message of the shipped files, memclnt first, each file in its own order\n\
             /// (the order VPP numbers them in).\npub static MESSAGES: &[MessageInfo] = &["
        )?;
        for r in &registry {
            writeln!(out, "    {r},")?;
        }
        writeln!(out, "];\n")?;
        writeln!(
            out,
            "/// The shipped API files (modules), in numbering order.\npub static MODULES: &[ApiModule] = &["
        )?;
        for f in &self.files {
            writeln!(
                out,
                "    ApiModule {{ name: \"{}\", crc: 0x{:08x}, version: \"{}\", messages: {} }},",
                f.module,
                f.crc,
                f.version,
                f.messages.len()
            )?;
        }
        writeln!(out, "];\n")?;
        writeln!(
            out,
            "/// Calls `v.visit::<M>()` with the generated type of message `name_crc`.\n\
             pub fn visit_message<V: crate::message::MessageVisitor>(name_crc: &str, v: V) -> Option<V::Output> {{\n    match name_crc {{"
        )?;
        for (name_crc, rust) in &self.visit_arms()? {
            writeln!(out, "        \"{name_crc}\" => Some(v.visit::<{rust}>()),")?;
        }
        writeln!(out, "        _ => None,\n    }}\n}}")?;
        Ok(out)
    }
}

fn main() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("api");
    println!("cargo:rerun-if-changed={}", dir.display());
    let generator = Gen::load(&dir)?;
    let code = generator.generate()?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("api.rs");
    std::fs::write(&out, code)?;
    Ok(())
}
