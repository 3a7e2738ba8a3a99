//! A narrow CQL test server — **test scaffolding, not ScyllaDB**. It speaks CQL native protocol v4 (frames
//! from the `cassandra-protocol` crate) well enough for the real `scylla` driver to connect, prepare and
//! execute hookline's statements, so that type mismatches, bind-marker counts and paging bugs of the
//! ScyllaDB adapter surface in tests on machines where no CQL server can be installed.
//!
//! What it does: tables are created from the CQL text the client sends (hookline's own
//! `schemas/scylla.cql` through `hookline::store::scylla::migrate`), with their column types; prepared
//! statements answer with bind and result metadata typed from those columns; every bound value is
//! checked against its column type (length of fixed-size types, well-formed collections); SELECT supports
//! a column list, equality on key columns, clustering order (ASC/DESC), `LIMIT`-free paging by page size
//! and paging state; INSERT (with `USING TTL` and the table's default TTL), UPDATE … SET, DELETE. The
//! system tables the driver reads at connect (`system.local`, `system.peers`, `system_schema.keyspaces`)
//! are canned. What it does not do: consistency, tokens, replication, lightweight transactions, batches,
//! secondary indexes, anything not listed.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use cassandra_protocol::frame::message_error::{ErrorBody, ErrorType};
use cassandra_protocol::frame::message_request::RequestBody;
use cassandra_protocol::frame::message_result::{
    BodyResResultPrepared, BodyResResultRows, BodyResResultSetKeyspace, ColSpec, ColType,
    ColTypeOption, ColTypeOptionValue, PreparedMetadata, ResResultBody, RowsMetadata,
    RowsMetadataFlags, TableSpec,
};
use cassandra_protocol::frame::message_supported::BodyResSupported;
use cassandra_protocol::frame::{Direction, Envelope, Flags, Opcode, Serialize, Version};
use cassandra_protocol::query::QueryValues;
use cassandra_protocol::types::value::Value as CValue;
use cassandra_protocol::types::{CBytes, CBytesShort};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A column type, as far as this server understands them.
#[derive(Debug, Clone, PartialEq)]
enum Ty {
    Uuid,
    Timeuuid,
    Text,
    Int,
    Bigint,
    Timestamp,
    Boolean,
    Inet,
    List(Box<Ty>),
    Set(Box<Ty>),
    Map(Box<Ty>, Box<Ty>),
}

impl Ty {
    fn parse(toks: &[String], i: &mut usize) -> Result<Ty, String> {
        let name = toks.get(*i).ok_or("type expected")?.to_lowercase();
        *i += 1;
        let inner = |i: &mut usize| -> Result<Ty, String> {
            expect(toks, i, "<")?;
            let t = Ty::parse(toks, i)?;
            Ok(t)
        };
        let t = match name.as_str() {
            "uuid" => Ty::Uuid,
            "timeuuid" => Ty::Timeuuid,
            "text" | "varchar" => Ty::Text,
            "int" => Ty::Int,
            "bigint" => Ty::Bigint,
            "timestamp" => Ty::Timestamp,
            "boolean" => Ty::Boolean,
            "inet" => Ty::Inet,
            "list" => {
                let t = inner(i)?;
                expect(toks, i, ">")?;
                Ty::List(Box::new(t))
            }
            "set" => {
                let t = inner(i)?;
                expect(toks, i, ">")?;
                Ty::Set(Box::new(t))
            }
            "map" => {
                let k = inner(i)?;
                expect(toks, i, ",")?;
                let v = Ty::parse(toks, i)?;
                expect(toks, i, ">")?;
                Ty::Map(Box::new(k), Box::new(v))
            }
            other => return Err(format!("type {other} is not supported by the test server")),
        };
        Ok(t)
    }

    fn option(&self) -> ColTypeOption {
        let simple = |id| ColTypeOption { id, value: None };
        match self {
            Ty::Uuid => simple(ColType::Uuid),
            Ty::Timeuuid => simple(ColType::Timeuuid),
            Ty::Text => simple(ColType::Varchar),
            Ty::Int => simple(ColType::Int),
            Ty::Bigint => simple(ColType::Bigint),
            Ty::Timestamp => simple(ColType::Timestamp),
            Ty::Boolean => simple(ColType::Boolean),
            Ty::Inet => simple(ColType::Inet),
            Ty::List(t) => ColTypeOption {
                id: ColType::List,
                value: Some(ColTypeOptionValue::CList(Box::new(t.option()))),
            },
            Ty::Set(t) => ColTypeOption {
                id: ColType::Set,
                value: Some(ColTypeOptionValue::CSet(Box::new(t.option()))),
            },
            Ty::Map(k, v) => ColTypeOption {
                id: ColType::Map,
                value: Some(ColTypeOptionValue::CMap(
                    Box::new(k.option()),
                    Box::new(v.option()),
                )),
            },
        }
    }

    /// Checks that `b` is a well-formed serialized value of this type.
    fn check(&self, b: &[u8]) -> Result<(), String> {
        let fixed = |n: usize, what: &str| {
            if b.len() == n {
                Ok(())
            } else {
                Err(format!("{what} must be {n} bytes, got {}", b.len()))
            }
        };
        match self {
            Ty::Uuid | Ty::Timeuuid => fixed(16, "uuid"),
            Ty::Int => fixed(4, "int"),
            Ty::Bigint | Ty::Timestamp => fixed(8, "bigint/timestamp"),
            Ty::Boolean => fixed(1, "boolean"),
            Ty::Inet => {
                if b.len() == 4 || b.len() == 16 {
                    Ok(())
                } else {
                    Err("inet must be 4 or 16 bytes".into())
                }
            }
            Ty::Text => std::str::from_utf8(b)
                .map(|_| ())
                .map_err(|_| "text must be UTF-8".into()),
            Ty::List(t) | Ty::Set(t) => {
                let mut c = 0usize;
                let n = read_i32(b, &mut c)?;
                for _ in 0..n {
                    let item = read_item(b, &mut c)?;
                    t.check(item)?;
                }
                if c != b.len() {
                    return Err("trailing bytes after collection".into());
                }
                Ok(())
            }
            Ty::Map(k, v) => {
                let mut c = 0usize;
                let n = read_i32(b, &mut c)?;
                for _ in 0..n {
                    k.check(read_item(b, &mut c)?)?;
                    v.check(read_item(b, &mut c)?)?;
                }
                if c != b.len() {
                    return Err("trailing bytes after map".into());
                }
                Ok(())
            }
        }
    }

    /// Orders two serialized values of this type (clustering order).
    fn cmp(&self, a: &[u8], b: &[u8]) -> std::cmp::Ordering {
        match self {
            Ty::Int | Ty::Bigint | Ty::Timestamp => {
                let v = |x: &[u8]| {
                    let mut buf = [0u8; 8];
                    let n = x.len().min(8);
                    buf[8 - n..].copy_from_slice(&x[..n]);
                    let raw = i64::from_be_bytes(buf);
                    // Sign-extend 4-byte ints.
                    if n == 4 { (raw as i32) as i64 } else { raw }
                };
                v(a).cmp(&v(b))
            }
            _ => a.cmp(b),
        }
    }
}

fn read_i32(b: &[u8], c: &mut usize) -> Result<i32, String> {
    let s = b.get(*c..*c + 4).ok_or("truncated collection")?;
    *c += 4;
    Ok(i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn read_item<'a>(b: &'a [u8], c: &mut usize) -> Result<&'a [u8], String> {
    let n = read_i32(b, c)?;
    if n < 0 {
        return Err("null inside a collection".into());
    }
    let s = b
        .get(*c..*c + n as usize)
        .ok_or("truncated collection item")?;
    *c += n as usize;
    Ok(s)
}

fn expect(toks: &[String], i: &mut usize, want: &str) -> Result<(), String> {
    match toks.get(*i) {
        Some(t) if t.eq_ignore_ascii_case(want) => {
            *i += 1;
            Ok(())
        }
        other => Err(format!("expected {want:?}, found {other:?}")),
    }
}

/// Splits CQL into tokens: identifiers/keywords/numbers, quoted strings (kept with their quotes),
/// `?`, and single punctuation characters.
fn tokenize(q: &str) -> Vec<String> {
    let mut out = Vec::new();
    let cs: Vec<char> = q.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' || c == '"' {
            let mut j = i + 1;
            while j < cs.len() && cs[j] != c {
                j += 1;
            }
            out.push(cs[i..(j + 1).min(cs.len())].iter().collect());
            i = j + 1;
        } else if c.is_alphanumeric() || c == '_' || c == '.' || c == '-' {
            let mut j = i;
            while j < cs.len()
                && (cs[j].is_alphanumeric() || cs[j] == '_' || cs[j] == '.' || cs[j] == '-')
            {
                j += 1;
            }
            out.push(cs[i..j].iter().collect());
            i = j;
        } else if c == '{' {
            // A map literal (replication): kept as one token.
            let mut j = i;
            while j < cs.len() && cs[j] != '}' {
                j += 1;
            }
            out.push(cs[i..(j + 1).min(cs.len())].iter().collect());
            i = j + 1;
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Table {
    keyspace: String,
    name: String,
    columns: Vec<(String, Ty)>,
    partition: Vec<String>,
    /// Clustering columns and whether they sort descending.
    clustering: Vec<(String, bool)>,
    default_ttl: Option<i64>,
}

impl Table {
    fn col(&self, name: &str) -> Result<(usize, &Ty), String> {
        self.columns
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| (i, &self.columns[i].1))
            .ok_or_else(|| format!("undefined column name {name} in table {}", self.name))
    }
}

/// Serialized column values of one row (None = null).
type Values = Vec<Option<Vec<u8>>>;
/// Key column values.
type Key = Vec<Vec<u8>>;

/// One stored row: column values (None = null) and the epoch second it expires (if any).
#[derive(Debug, Clone)]
struct Row {
    values: Vec<Option<Vec<u8>>>,
    expires_s: Option<i64>,
}

/// What a WHERE/VALUES slot refers to: a bind marker or a literal.
#[derive(Debug, Clone)]
enum Operand {
    Bind,
    Literal(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Stmt {
    Select {
        table: String,
        columns: Vec<String>,
        filter: Vec<(String, Operand)>,
    },
    /// INSERT and UPDATE … SET: columns to write, key from the same list (UPDATE: SET then WHERE).
    Upsert {
        table: String,
        assignments: Vec<(String, Operand)>,
        ttl: Option<Operand>,
    },
    Delete {
        table: String,
        filter: Vec<(String, Operand)>,
    },
    CreateTable(Table),
    /// ALTER TABLE t ADD col type
    AddColumn {
        table: String,
        column: String,
        ty: Ty,
    },
    Use(String),
    Void,
}

impl Stmt {
    /// Bind markers in order, with their types (`[ttl]` is an int).
    fn binds(&self, db: &Db) -> Result<Vec<(String, Ty)>, String> {
        let mut out = Vec::new();
        let table = match self {
            Stmt::Select { table, .. }
            | Stmt::Upsert { table, .. }
            | Stmt::Delete { table, .. } => db.table(table)?,
            _ => return Ok(out),
        };
        let mut push = |list: &[(String, Operand)]| -> Result<(), String> {
            for (c, o) in list {
                if let Operand::Bind = o {
                    out.push((c.clone(), table.col(c)?.1.clone()));
                }
            }
            Ok(())
        };
        match self {
            Stmt::Select { filter, .. } | Stmt::Delete { filter, .. } => push(filter)?,
            Stmt::Upsert {
                assignments, ttl, ..
            } => {
                push(assignments)?;
                if let Some(Operand::Bind) = ttl {
                    out.push(("[ttl]".into(), Ty::Int));
                }
            }
            _ => {}
        }
        Ok(out)
    }
}

#[derive(Default)]
struct Db {
    tables: HashMap<String, Table>,
    /// Per table: partition key bytes → clustering key bytes → row.
    data: HashMap<String, BTreeMap<Key, Vec<(Key, Row)>>>,
    prepared: HashMap<Vec<u8>, Stmt>,
    keyspaces: Vec<String>,
    /// Statements executed, by kind (for tests that want to see the adapter's traffic).
    pub executed: HashMap<String, u64>,
}

impl Db {
    fn table(&self, name: &str) -> Result<&Table, String> {
        self.tables
            .get(name)
            .ok_or_else(|| format!("unconfigured table {name}"))
    }
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn unquote(s: &str) -> String {
    s.trim_matches('"').to_string()
}

/// Resolves a table reference against the connection's keyspace: `ks.t` or `t`.
fn qualify(name: &str, ks: &Option<String>) -> String {
    let name = unquote(name);
    if name.contains('.') {
        name
    } else {
        format!("{}.{}", ks.clone().unwrap_or_default(), name)
    }
}

fn literal(tok: &str) -> Result<Operand, String> {
    if tok == "?" {
        return Ok(Operand::Bind);
    }
    if let Some(s) = tok.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return Ok(Operand::Literal(s.as_bytes().to_vec()));
    }
    if let Ok(n) = tok.parse::<i32>() {
        return Ok(Operand::Literal(n.to_be_bytes().to_vec()));
    }
    Err(format!("unsupported operand {tok}"))
}

fn parse_where(toks: &[String], i: &mut usize) -> Result<Vec<(String, Operand)>, String> {
    let mut out = Vec::new();
    if toks
        .get(*i)
        .is_some_and(|t| t.eq_ignore_ascii_case("where"))
    {
        *i += 1;
        loop {
            let col = toks.get(*i).ok_or("column expected")?.to_lowercase();
            *i += 1;
            expect(toks, i, "=")?;
            out.push((col, literal(toks.get(*i).ok_or("value expected")?)?));
            *i += 1;
            if toks.get(*i).is_some_and(|t| t.eq_ignore_ascii_case("and")) {
                *i += 1;
            } else {
                break;
            }
        }
    }
    Ok(out)
}

fn parse(q: &str, ks: &Option<String>) -> Result<Stmt, String> {
    let toks = tokenize(q.trim().trim_end_matches(';'));
    let kw = |i: usize| toks.get(i).map(|t| t.to_lowercase()).unwrap_or_default();
    let mut i;
    match kw(0).as_str() {
        "use" => Ok(Stmt::Use(unquote(toks.get(1).ok_or("keyspace expected")?))),
        "select" => {
            i = 1;
            let mut columns = Vec::new();
            while kw(i) != "from" {
                let t = toks.get(i).ok_or("FROM expected")?;
                if t != "," {
                    columns.push(t.to_lowercase());
                }
                i += 1;
            }
            i += 1;
            let table = qualify(toks.get(i).ok_or("table expected")?, ks);
            i += 1;
            let filter = parse_where(&toks, &mut i)?;
            if i < toks.len() && kw(i) != "allow" {
                return Err(format!("unsupported SELECT clause at {:?}", toks[i]));
            }
            Ok(Stmt::Select {
                table,
                columns,
                filter,
            })
        }
        "insert" => {
            expect(&toks, &mut 1, "into")?;
            let table = qualify(toks.get(2).ok_or("table expected")?, ks);
            i = 3;
            expect(&toks, &mut i, "(")?;
            let mut cols = Vec::new();
            while toks.get(i).is_some_and(|t| t != ")") {
                if toks[i] != "," {
                    cols.push(toks[i].to_lowercase());
                }
                i += 1;
            }
            i += 1;
            expect(&toks, &mut i, "values")?;
            expect(&toks, &mut i, "(")?;
            let mut vals = Vec::new();
            while toks.get(i).is_some_and(|t| t != ")") {
                if toks[i] != "," {
                    vals.push(literal(&toks[i])?);
                }
                i += 1;
            }
            i += 1;
            if cols.len() != vals.len() {
                return Err(format!("{} columns but {} values", cols.len(), vals.len()));
            }
            let mut ttl = None;
            if kw(i) == "using" {
                expect(&toks, &mut (i + 1), "ttl")?;
                ttl = Some(literal(toks.get(i + 2).ok_or("TTL value expected")?)?);
                i += 3;
            }
            if i < toks.len() {
                return Err(format!("unsupported INSERT clause at {:?}", toks[i]));
            }
            Ok(Stmt::Upsert {
                table,
                assignments: cols.into_iter().zip(vals).collect(),
                ttl,
            })
        }
        "update" => {
            let table = qualify(toks.get(1).ok_or("table expected")?, ks);
            i = 2;
            expect(&toks, &mut i, "set")?;
            let mut assignments = Vec::new();
            loop {
                let col = toks.get(i).ok_or("column expected")?.to_lowercase();
                i += 1;
                expect(&toks, &mut i, "=")?;
                assignments.push((col, literal(toks.get(i).ok_or("value expected")?)?));
                i += 1;
                if toks.get(i).is_some_and(|t| t == ",") {
                    i += 1;
                } else {
                    break;
                }
            }
            let filter = parse_where(&toks, &mut i)?;
            if filter.is_empty() {
                return Err("UPDATE needs WHERE".into());
            }
            assignments.extend(filter);
            Ok(Stmt::Upsert {
                table,
                assignments,
                ttl: None,
            })
        }
        "delete" => {
            expect(&toks, &mut 1, "from")?;
            let table = qualify(toks.get(2).ok_or("table expected")?, ks);
            i = 3;
            let filter = parse_where(&toks, &mut i)?;
            Ok(Stmt::Delete { table, filter })
        }
        "create" if kw(1) == "keyspace" => Ok(Stmt::Void),
        "create" if kw(1) == "table" => parse_create_table(&toks, ks).map(Stmt::CreateTable),
        "alter" if kw(1) == "table" && kw(3) == "add" => {
            let table = qualify(toks.get(2).ok_or("table expected")?, ks);
            let column = toks.get(4).ok_or("column expected")?.to_lowercase();
            i = 5;
            let ty = Ty::parse(&toks, &mut i)?;
            Ok(Stmt::AddColumn { table, column, ty })
        }
        other => Err(format!(
            "statement {other:?} is not supported by the test server"
        )),
    }
}

fn parse_create_table(toks: &[String], ks: &Option<String>) -> Result<Table, String> {
    let mut i = 2;
    if toks.get(i).is_some_and(|t| t.eq_ignore_ascii_case("if")) {
        i += 3; // IF NOT EXISTS
    }
    let full = qualify(toks.get(i).ok_or("table name expected")?, ks);
    let (keyspace, name) = full.split_once('.').ok_or("keyspace expected")?;
    i += 1;
    expect(toks, &mut i, "(")?;
    let mut t = Table {
        keyspace: keyspace.into(),
        name: name.into(),
        columns: Vec::new(),
        partition: Vec::new(),
        clustering: Vec::new(),
        default_ttl: None,
    };
    loop {
        if toks
            .get(i)
            .is_some_and(|x| x.eq_ignore_ascii_case("primary"))
        {
            i += 2; // PRIMARY KEY
            expect(toks, &mut i, "(")?;
            if toks.get(i).is_some_and(|x| x == "(") {
                i += 1;
                while toks.get(i).is_some_and(|x| x != ")") {
                    if toks[i] != "," {
                        t.partition.push(toks[i].to_lowercase());
                    }
                    i += 1;
                }
                i += 1;
            } else {
                t.partition
                    .push(toks.get(i).ok_or("key expected")?.to_lowercase());
                i += 1;
            }
            while toks.get(i).is_some_and(|x| x != ")") {
                if toks[i] != "," {
                    t.clustering.push((toks[i].to_lowercase(), false));
                }
                i += 1;
            }
            i += 1;
        } else {
            let col = toks.get(i).ok_or("column expected")?.to_lowercase();
            i += 1;
            let ty = Ty::parse(toks, &mut i)?;
            if toks
                .get(i)
                .is_some_and(|x| x.eq_ignore_ascii_case("primary"))
            {
                t.partition.push(col.clone());
                i += 2;
            }
            t.columns.push((col, ty));
        }
        match toks.get(i).map(String::as_str) {
            Some(",") => i += 1,
            Some(")") => {
                i += 1;
                break;
            }
            other => return Err(format!("unexpected {other:?} in CREATE TABLE")),
        }
    }
    // WITH CLUSTERING ORDER BY (c DESC, ...) AND default_time_to_live = N
    while i < toks.len() {
        let k = toks[i].to_lowercase();
        if k == "clustering" {
            i += 3; // CLUSTERING ORDER BY
            expect(toks, &mut i, "(")?;
            while toks.get(i).is_some_and(|x| x != ")") {
                let col = toks[i].to_lowercase();
                let desc = toks
                    .get(i + 1)
                    .is_some_and(|x| x.eq_ignore_ascii_case("desc"));
                if let Some(c) = t.clustering.iter_mut().find(|(n, _)| *n == col) {
                    c.1 = desc;
                }
                i += 2;
                if toks.get(i).is_some_and(|x| x == ",") {
                    i += 1;
                }
            }
            i += 1;
        } else if k == "default_time_to_live" {
            t.default_ttl = toks.get(i + 2).and_then(|v| v.parse().ok());
            i += 3;
        } else {
            i += 1;
        }
    }
    for c in t
        .partition
        .iter()
        .chain(t.clustering.iter().map(|(c, _)| c))
    {
        t.col(c)?;
    }
    Ok(t)
}

fn system_tables() -> Vec<(Table, Vec<Values>)> {
    let text = |s: &str| Some(s.as_bytes().to_vec());
    let set_of = |items: &[&str]| {
        let mut b = (items.len() as i32).to_be_bytes().to_vec();
        for s in items {
            b.extend_from_slice(&(s.len() as i32).to_be_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        Some(b)
    };
    let host = Some(uuid::Uuid::from_u128(0x1d).as_bytes().to_vec());
    let local = Table {
        keyspace: "system".into(),
        name: "local".into(),
        columns: vec![
            ("key".into(), Ty::Text),
            ("host_id".into(), Ty::Uuid),
            ("rpc_address".into(), Ty::Inet),
            ("data_center".into(), Ty::Text),
            ("rack".into(), Ty::Text),
            ("tokens".into(), Ty::Set(Box::new(Ty::Text))),
            ("cluster_name".into(), Ty::Text),
            ("schema_version".into(), Ty::Uuid),
        ],
        partition: vec!["key".into()],
        clustering: vec![],
        default_ttl: None,
    };
    let local_row = vec![
        text("local"),
        host,
        Some(vec![127, 0, 0, 1]),
        text("dc1"),
        text("rack1"),
        set_of(&["0"]),
        text("hookline-cql-test-server"),
        Some(uuid::Uuid::from_u128(0x5c).as_bytes().to_vec()),
    ];
    let peers = Table {
        keyspace: "system".into(),
        name: "peers".into(),
        columns: vec![
            ("peer".into(), Ty::Inet),
            ("host_id".into(), Ty::Uuid),
            ("rpc_address".into(), Ty::Inet),
            ("data_center".into(), Ty::Text),
            ("rack".into(), Ty::Text),
            ("tokens".into(), Ty::Set(Box::new(Ty::Text))),
            ("schema_version".into(), Ty::Uuid),
        ],
        partition: vec!["peer".into()],
        clustering: vec![],
        default_ttl: None,
    };
    let keyspaces = Table {
        keyspace: "system_schema".into(),
        name: "keyspaces".into(),
        columns: vec![
            ("keyspace_name".into(), Ty::Text),
            (
                "replication".into(),
                Ty::Map(Box::new(Ty::Text), Box::new(Ty::Text)),
            ),
            ("durable_writes".into(), Ty::Boolean),
        ],
        partition: vec!["keyspace_name".into()],
        clustering: vec![],
        default_ttl: None,
    };
    vec![
        (local, vec![local_row]),
        (peers, vec![]),
        (keyspaces, vec![]),
    ]
}

/// A running test server. Dropping it stops it.
pub struct CqlServer {
    pub addr: SocketAddr,
    db: Arc<Mutex<Db>>,
    accept: Mutex<Option<JoinHandle<()>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl CqlServer {
    pub async fn start() -> CqlServer {
        let mut db = Db::default();
        for (t, rows) in system_tables() {
            let key = format!("{}.{}", t.keyspace, t.name);
            let store = db.data.entry(key.clone()).or_default();
            for r in rows {
                let pk = vec![r[0].clone().unwrap_or_default()];
                store.entry(pk).or_default().push((
                    vec![],
                    Row {
                        values: r,
                        expires_s: None,
                    },
                ));
            }
            db.tables.insert(key, t);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = CqlServer {
            addr,
            db: Arc::new(Mutex::new(db)),
            accept: Mutex::new(None),
            conns: Arc::default(),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: TcpListener) {
        let db = self.db.clone();
        let conns = self.conns.clone();
        let h = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let db = db.clone();
                let c = tokio::spawn(async move {
                    let _ = connection(sock, db).await;
                });
                conns.lock().unwrap().push(c);
            }
        });
        *self.accept.lock().unwrap() = Some(h);
    }

    /// Stops accepting and drops every connection (an outage); the data stays.
    pub fn stop(&self) {
        if let Some(h) = self.accept.lock().unwrap().take() {
            h.abort();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Accepts connections again on the same address.
    pub async fn resume(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    /// How many statements of a kind (`select`, `insert`, `update`, `delete`, `prepare`) were run.
    pub fn executed(&self, kind: &str) -> u64 {
        self.db
            .lock()
            .unwrap()
            .executed
            .get(kind)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for CqlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn error(msg: impl Into<String>, ty: ErrorType) -> (Opcode, Vec<u8>) {
    let body = ErrorBody {
        message: msg.into(),
        ty,
    };
    (Opcode::Error, body.serialize_to_vec(Version::V4))
}

fn result(r: ResResultBody) -> (Opcode, Vec<u8>) {
    (Opcode::Result, r.serialize_to_vec(Version::V4))
}

async fn connection(mut sock: TcpStream, db: Arc<Mutex<Db>>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut keyspace: Option<String> = None;
    loop {
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let parsed = match Envelope::from_buffer(
                &buf,
                cassandra_protocol::compression::Compression::None,
            ) {
                Ok(p) => p,
                Err(cassandra_protocol::frame::ParseEnvelopeError::NotEnoughBytes) => break,
                Err(_) => return Ok(()),
            };
            buf.drain(..parsed.envelope_len);
            let req = parsed.envelope;
            let (opcode, body) = handle(&req, &db, &mut keyspace);
            let resp = Envelope::new(
                Version::V4,
                Direction::Response,
                Flags::empty(),
                opcode,
                req.stream_id,
                body,
                None,
                vec![],
            );
            let bytes = resp
                .encode_with(cassandra_protocol::compression::Compression::None)
                .unwrap_or_default();
            sock.write_all(&bytes).await?;
        }
    }
}

fn handle(req: &Envelope, db: &Arc<Mutex<Db>>, ks: &mut Option<String>) -> (Opcode, Vec<u8>) {
    let body = match req.request_body() {
        Ok(b) => b,
        Err(e) => return error(format!("cannot parse request: {e}"), ErrorType::Protocol),
    };
    match body {
        RequestBody::Options(_) => {
            let mut data = HashMap::new();
            data.insert("CQL_VERSION".to_string(), vec!["3.4.5".to_string()]);
            data.insert("COMPRESSION".to_string(), vec![]);
            (
                Opcode::Supported,
                BodyResSupported { data }.serialize_to_vec(Version::V4),
            )
        }
        RequestBody::Startup(_) | RequestBody::Register(_) => (Opcode::Ready, Vec::new()),
        RequestBody::Query(q) => {
            let stmt = match parse(&q.query, ks) {
                Ok(s) => s,
                Err(e) => return error(e, ErrorType::Invalid),
            };
            let values = match q.query_params.values {
                Some(QueryValues::SimpleValues(v)) => v,
                Some(QueryValues::NamedValues(_)) => {
                    return error("named values are not supported", ErrorType::Invalid);
                }
                None => Vec::new(),
            };
            run(
                &stmt,
                &values,
                q.query_params.page_size,
                q.query_params.paging_state.as_ref(),
                db,
                ks,
            )
        }
        RequestBody::Prepare(p) => {
            let stmt = match parse(&p.query, ks) {
                Ok(s) => s,
                Err(e) => return error(e, ErrorType::Invalid),
            };
            let mut g = db.lock().unwrap();
            *g.executed.entry("prepare".into()).or_default() += 1;
            let binds = match stmt.binds(&g) {
                Ok(b) => b,
                Err(e) => return error(e, ErrorType::Invalid),
            };
            let result_cols = match &stmt {
                Stmt::Select { table, columns, .. } => match select_specs(&g, table, columns) {
                    Ok(c) => c,
                    Err(e) => return error(e, ErrorType::Invalid),
                },
                _ => Vec::new(),
            };
            let id = uuid::Uuid::new_v4().as_bytes().to_vec();
            g.prepared.insert(id.clone(), stmt.clone());
            let table = match &stmt {
                Stmt::Select { table, .. }
                | Stmt::Upsert { table, .. }
                | Stmt::Delete { table, .. } => table.clone(),
                _ => "x.x".into(),
            };
            let spec = table_spec(&table);
            let pk_indexes = match g.tables.get(&table) {
                Some(t) => binds
                    .iter()
                    .enumerate()
                    .filter(|(_, (c, _))| t.partition.contains(c))
                    .map(|(i, _)| i as i16)
                    .collect(),
                None => vec![],
            };
            result(ResResultBody::Prepared(BodyResResultPrepared {
                id: CBytesShort::new(id),
                result_metadata_id: None,
                metadata: PreparedMetadata {
                    pk_indexes,
                    global_table_spec: Some(spec.clone()),
                    col_specs: binds
                        .iter()
                        .map(|(n, t)| ColSpec {
                            table_spec: None,
                            name: n.clone(),
                            col_type: t.option(),
                        })
                        .collect(),
                },
                result_metadata: if result_cols.is_empty() {
                    RowsMetadata {
                        flags: RowsMetadataFlags::NO_METADATA,
                        columns_count: 0,
                        paging_state: None,
                        new_metadata_id: None,
                        global_table_spec: None,
                        col_specs: vec![],
                    }
                } else {
                    RowsMetadata {
                        flags: RowsMetadataFlags::GLOBAL_TABLE_SPACE,
                        columns_count: result_cols.len() as i32,
                        paging_state: None,
                        new_metadata_id: None,
                        global_table_spec: Some(spec),
                        col_specs: result_cols,
                    }
                },
            }))
        }
        RequestBody::Execute(e) => {
            let id = e.id.into_bytes().unwrap_or_default();
            let stmt = match db.lock().unwrap().prepared.get(&id) {
                Some(s) => s.clone(),
                None => {
                    return error(
                        "unknown prepared statement",
                        ErrorType::Unprepared(
                            cassandra_protocol::frame::message_error::UnpreparedError {
                                id: CBytesShort::new(id),
                            },
                        ),
                    );
                }
            };
            let values = match e.query_parameters.values {
                Some(QueryValues::SimpleValues(v)) => v,
                Some(QueryValues::NamedValues(_)) => {
                    return error("named values are not supported", ErrorType::Invalid);
                }
                None => Vec::new(),
            };
            run(
                &stmt,
                &values,
                e.query_parameters.page_size,
                e.query_parameters.paging_state.as_ref(),
                db,
                ks,
            )
        }
        RequestBody::Batch(_) => error("batches are not supported", ErrorType::Invalid),
        RequestBody::AuthResponse(_) => (Opcode::AuthSuccess, vec![0xff, 0xff, 0xff, 0xff]),
        _ => error(
            "request not supported by the test server",
            ErrorType::Protocol,
        ),
    }
}

fn table_spec(full: &str) -> TableSpec {
    let (ks, t) = full.split_once('.').unwrap_or(("", full));
    TableSpec {
        ks_name: ks.into(),
        table_name: t.into(),
    }
}

fn select_specs(db: &Db, table: &str, columns: &[String]) -> Result<Vec<ColSpec>, String> {
    let t = db.table(table)?;
    let names: Vec<String> = if columns.len() == 1 && columns[0] == "*" {
        t.columns.iter().map(|(n, _)| n.clone()).collect()
    } else {
        columns.to_vec()
    };
    names
        .iter()
        .map(|n| {
            Ok(ColSpec {
                table_spec: None,
                name: n.clone(),
                col_type: t.col(n)?.1.option(),
            })
        })
        .collect()
}

/// (column index, value) pairs.
type Assignments = Vec<(usize, Option<Vec<u8>>)>;

/// Binds values to operands and checks each against its column type.
fn resolve(
    list: &[(String, Operand)],
    values: &mut std::slice::Iter<'_, CValue>,
    t: &Table,
) -> Result<Assignments, String> {
    let mut out = Vec::new();
    for (c, o) in list {
        let (idx, ty) = t.col(c)?;
        let v = match o {
            Operand::Literal(b) => Some(b.clone()),
            Operand::Bind => match values.next() {
                Some(CValue::Some(b)) => Some(b.clone()),
                Some(CValue::Null) => None,
                Some(CValue::NotSet) => continue,
                None => return Err(format!("no value bound for {c}")),
            },
        };
        if let Some(b) = &v {
            ty.check(b)
                .map_err(|e| format!("column {c} ({ty:?}): {e}"))?;
        }
        out.push((idx, v));
    }
    Ok(out)
}

fn run(
    stmt: &Stmt,
    values: &[CValue],
    page_size: Option<i32>,
    paging_state: Option<&CBytes>,
    db: &Arc<Mutex<Db>>,
    ks: &mut Option<String>,
) -> (Opcode, Vec<u8>) {
    let mut g = db.lock().unwrap();
    let expected = match stmt.binds(&g) {
        Ok(b) => b.len(),
        Err(e) => return error(e, ErrorType::Invalid),
    };
    if values.len() != expected {
        return error(
            format!("expected {expected} bound values, got {}", values.len()),
            ErrorType::Invalid,
        );
    }
    let mut it = values.iter();
    match stmt {
        Stmt::Use(k) => {
            *ks = Some(k.clone());
            result(ResResultBody::SetKeyspace(BodyResResultSetKeyspace {
                body: k.clone(),
            }))
        }
        Stmt::Void => {
            *g.executed.entry("ddl".into()).or_default() += 1;
            result(ResResultBody::Void)
        }
        Stmt::CreateTable(t) => {
            let key = format!("{}.{}", t.keyspace, t.name);
            g.tables.entry(key).or_insert_with(|| t.clone());
            result(ResResultBody::Void)
        }
        Stmt::AddColumn { table, column, ty } => {
            let Some(t) = g.tables.get_mut(table) else {
                return error(format!("table {table} does not exist"), ErrorType::Invalid);
            };
            // Cassandra's and ScyllaDB's answer to a column that is already there.
            if t.columns.iter().any(|(c, _)| c == column) {
                return error(
                    format!(
                        "Invalid column name {column} because it conflicts with an existing column"
                    ),
                    ErrorType::Invalid,
                );
            }
            t.columns.push((column.clone(), ty.clone()));
            for part in g
                .data
                .get_mut(table)
                .into_iter()
                .flat_map(|d| d.values_mut())
            {
                for (_, row) in part.iter_mut() {
                    row.values.push(None);
                }
            }
            result(ResResultBody::Void)
        }
        Stmt::Upsert {
            table,
            assignments,
            ttl,
        } => {
            let t = match g.table(table) {
                Ok(t) => t.clone(),
                Err(e) => return error(e, ErrorType::Invalid),
            };
            let set = match resolve(assignments, &mut it, &t) {
                Ok(s) => s,
                Err(e) => return error(e, ErrorType::Invalid),
            };
            let ttl_s = match ttl {
                Some(Operand::Bind) => match it.next() {
                    Some(CValue::Some(b)) if b.len() == 4 => {
                        Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as i64)
                    }
                    _ => return error("TTL must be a bound int", ErrorType::Invalid),
                },
                Some(Operand::Literal(b)) if b.len() == 4 => {
                    Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as i64)
                }
                _ => t.default_ttl,
            };
            let key_of = |cols: &[String]| -> Result<Vec<Vec<u8>>, String> {
                cols.iter()
                    .map(|c| {
                        let (idx, _) = t.col(c)?;
                        set.iter()
                            .find(|(i, _)| *i == idx)
                            .and_then(|(_, v)| v.clone())
                            .ok_or_else(|| format!("missing key column {c}"))
                    })
                    .collect()
            };
            let ck_names: Vec<String> = t.clustering.iter().map(|(c, _)| c.clone()).collect();
            let (pk, ck) = match (key_of(&t.partition), key_of(&ck_names)) {
                (Ok(p), Ok(c)) => (p, c),
                (Err(e), _) | (_, Err(e)) => return error(e, ErrorType::Invalid),
            };
            *g.executed
                .entry(if ttl.is_some() { "insert" } else { "upsert" }.into())
                .or_default() += 1;
            let part = g
                .data
                .entry(table.clone())
                .or_default()
                .entry(pk)
                .or_default();
            let expires_s = ttl_s.filter(|s| *s > 0).map(|s| now_s() + s);
            match part.iter_mut().find(|(k, _)| *k == ck) {
                Some((_, row)) => {
                    for (idx, v) in set {
                        row.values[idx] = v;
                    }
                    row.expires_s = expires_s;
                }
                None => {
                    let mut row = Row {
                        values: vec![None; t.columns.len()],
                        expires_s,
                    };
                    for (idx, v) in set {
                        row.values[idx] = v;
                    }
                    part.push((ck, row));
                    part.sort_by(|a, b| {
                        for (n, ((c, desc), (x, y))) in t
                            .clustering
                            .iter()
                            .zip(a.0.iter().zip(b.0.iter()))
                            .enumerate()
                        {
                            let _ = n;
                            let ty = &t.col(c).map(|x| x.1.clone()).unwrap_or(Ty::Text);
                            let o = ty.cmp(x, y);
                            let o = if *desc { o.reverse() } else { o };
                            if o != std::cmp::Ordering::Equal {
                                return o;
                            }
                        }
                        std::cmp::Ordering::Equal
                    });
                }
            }
            result(ResResultBody::Void)
        }
        Stmt::Delete { table, filter } => {
            let t = match g.table(table) {
                Ok(t) => t.clone(),
                Err(e) => return error(e, ErrorType::Invalid),
            };
            let keys = match resolve(filter, &mut it, &t) {
                Ok(k) => k,
                Err(e) => return error(e, ErrorType::Invalid),
            };
            let pk: Option<Vec<Vec<u8>>> = t
                .partition
                .iter()
                .map(|c| {
                    let idx = t.col(c).ok()?.0;
                    keys.iter()
                        .find(|(i, _)| *i == idx)
                        .and_then(|(_, v)| v.clone())
                })
                .collect();
            let Some(pk) = pk else {
                return error("DELETE needs the whole partition key", ErrorType::Invalid);
            };
            *g.executed.entry("delete".into()).or_default() += 1;
            if let Some(d) = g.data.get_mut(table) {
                d.remove(&pk);
            }
            result(ResResultBody::Void)
        }
        Stmt::Select {
            table,
            columns,
            filter,
        } => {
            let t = match g.table(table) {
                Ok(t) => t.clone(),
                Err(e) => return error(e, ErrorType::Invalid),
            };
            let specs = match select_specs(&g, table, columns) {
                Ok(s) => s,
                Err(e) => return error(e, ErrorType::Invalid),
            };
            let conds = match resolve(filter, &mut it, &t) {
                Ok(c) => c,
                Err(e) => return error(e, ErrorType::Invalid),
            };
            *g.executed.entry("select".into()).or_default() += 1;
            let now = now_s();
            let idxs: Vec<usize> = specs
                .iter()
                .filter_map(|s| t.col(&s.name).ok().map(|c| c.0))
                .collect();
            let mut rows: Vec<Vec<CBytes>> = Vec::new();
            if let Some(d) = g.data.get(table) {
                for part in d.values() {
                    for (_, row) in part {
                        if row.expires_s.is_some_and(|e| e <= now) {
                            continue;
                        }
                        if conds
                            .iter()
                            .all(|(i, v)| row.values[*i].as_deref() == v.as_deref())
                        {
                            rows.push(
                                idxs.iter()
                                    .map(|i| match &row.values[*i] {
                                        Some(b) => CBytes::new(b.clone()),
                                        None => CBytes::new_null(),
                                    })
                                    .collect(),
                            );
                        }
                    }
                }
            }
            // Paging: the state is the offset of the next row, 8 bytes, behind a 2-byte tag.
            let start = match paging_state.and_then(|p| p.as_slice()) {
                None => 0usize,
                Some(b) if b.len() == 10 && &b[..2] == b"hl" => {
                    let mut o = [0u8; 8];
                    o.copy_from_slice(&b[2..]);
                    u64::from_be_bytes(o) as usize
                }
                Some(_) => return error("invalid paging state", ErrorType::Protocol),
            };
            let size = page_size
                .filter(|s| *s > 0)
                .map_or(usize::MAX, |s| s as usize);
            let total = rows.len();
            let page: Vec<Vec<CBytes>> = rows.into_iter().skip(start).take(size).collect();
            let next = start + page.len();
            let (flags, state) = if next < total {
                let mut b = b"hl".to_vec();
                b.extend_from_slice(&(next as u64).to_be_bytes());
                (
                    RowsMetadataFlags::GLOBAL_TABLE_SPACE | RowsMetadataFlags::HAS_MORE_PAGES,
                    Some(CBytes::new(b)),
                )
            } else {
                (RowsMetadataFlags::GLOBAL_TABLE_SPACE, None)
            };
            result(ResResultBody::Rows(BodyResResultRows {
                metadata: RowsMetadata {
                    flags,
                    columns_count: specs.len() as i32,
                    paging_state: state,
                    new_metadata_id: None,
                    global_table_spec: Some(table_spec(table)),
                    col_specs: specs,
                },
                rows_count: page.len() as i32,
                rows_content: page,
                protocol_version: Version::V4,
            }))
        }
    }
}
