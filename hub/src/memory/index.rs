//! The full-text index of memory search (tantivy, BM25): one document per chat message and per
//! saved memory, in `<data_dir>/memory-index/` (or in RAM for the `memory` store).
//!
//! Fields: `key` (the document's unique term: [`message_key`] / [`memory_key`]), `owner` and
//! `session` (exact-match terms: a search always requires the caller's owner term), `ts`
//! (Unix ms, a fast field for `since`), `text` (the [`tokenizer`](super::tokenizer)'s terms
//! with frequencies, no positions: BM25 needs no more), and stored `sid`, `role`, `content`,
//! `vec` (the embedding as little-endian `f32`s, with hybrid ranking).
//!
//! Every change is an [`Op`]; [`MemoryIndex::apply`] deletes each document's key before adding
//! it again (so replaying the feed is harmless) and commits with the feed sequence number it
//! has reached as the commit's payload, which [`MemoryIndex::open`] reads back: a restarted hub
//! resumes the feed there. Only one task writes (the feed's tailer); searches run beside it on
//! the last reloaded commit.

use std::ops::Bound;
use std::path::Path;

use parking_lot::Mutex;
use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::query::{BooleanQuery, ConstScoreQuery, Occur, Query, RangeQuery, TermQuery};
use tantivy::schema::{
    FAST, Field, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions,
    Value as _,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use super::tokenizer;

/// The index writer's memory budget, in bytes (tantivy's minimum is 15 MB).
const WRITER_BYTES: usize = 20_000_000;

/// The document key of message `seq` of session `sid` of `owner`.
pub fn message_key(owner: &str, sid: &str, seq: u64) -> String {
    format!("m\u{1}{owner}\u{1}{sid}\u{1}{seq}")
}

/// The document key of saved memory `id` of `owner`.
pub fn memory_key(owner: &str, id: &str) -> String {
    format!("s\u{1}{owner}\u{1}{id}")
}

/// The session term of session `sid` of `owner`.
pub fn session_term(owner: &str, sid: &str) -> String {
    format!("{owner}\u{1}{sid}")
}

/// A document to index.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    /// [`message_key`] or [`memory_key`].
    pub key: String,
    /// The owner (the caller's [`Principal::owner`](crate::principal::Principal::owner)).
    pub owner: String,
    /// The session id of a message; `None` for a saved memory.
    pub sid: Option<String>,
    /// `user`, `assistant`, `system`, `tool`, or `memory` for a saved memory.
    pub role: String,
    /// When it was said or saved, Unix ms.
    pub ts_ms: i64,
    /// The text returned in results.
    pub content: String,
    /// More indexed text that results do not show (a memory's tags).
    pub extra: String,
    /// Its embedding, with hybrid ranking.
    pub vector: Option<Vec<f32>>,
}

/// One change to the index.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Adds the document, replacing any with its key.
    Upsert(Doc),
    /// Removes the document with this key.
    Delete(String),
    /// Removes every document of a session ([`session_term`]).
    DropSession(String),
}

/// What a search asks.
#[derive(Debug, Clone)]
pub struct Search<'a> {
    /// Only this owner's documents.
    pub owner: &'a str,
    /// The query's terms (any may match).
    pub terms: &'a [String],
    /// Only this session ([`session_term`]).
    pub session: Option<&'a str>,
    /// Only documents at or after this time, Unix ms.
    pub since_ms: Option<i64>,
    /// Most hits.
    pub limit: usize,
}

/// One search hit, with its stored fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The BM25 score.
    pub score: f32,
    /// The document key.
    pub key: String,
    /// The session id of a message.
    pub sid: Option<String>,
    /// The role (`memory` for a saved memory).
    pub role: String,
    /// Unix ms.
    pub ts_ms: i64,
    /// The text.
    pub content: String,
    /// Its embedding, when it has one.
    pub vector: Option<Vec<f32>>,
}

#[derive(Debug, Clone, Copy)]
struct Fields {
    key: Field,
    owner: Field,
    session: Field,
    sid: Field,
    role: Field,
    ts: Field,
    content: Field,
    text: Field,
    vec: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let text = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(tokenizer::NAME)
            .set_index_option(IndexRecordOption::WithFreqs),
    );
    let f = Fields {
        key: b.add_text_field("key", STRING | STORED),
        owner: b.add_text_field("owner", STRING | STORED),
        session: b.add_text_field("session", STRING),
        sid: b.add_text_field("sid", STORED),
        role: b.add_text_field("role", STORED),
        ts: b.add_i64_field("ts", FAST | STORED),
        content: b.add_text_field("content", STORED),
        text: b.add_text_field("text", text),
        vec: b.add_bytes_field("vec", STORED),
    };
    (b.build(), f)
}

/// The index, its reader and its one writer.
pub struct MemoryIndex {
    reader: IndexReader,
    writer: Mutex<IndexWriter>,
    f: Fields,
    on_disk: bool,
}

impl std::fmt::Debug for MemoryIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryIndex")
            .field("on_disk", &self.on_disk)
            .finish()
    }
}

impl MemoryIndex {
    /// Opens (or creates) the index in `dir`, or in RAM when `dir` is `None`. Returns it and
    /// the feed sequence number its last commit reached (0 for a new index).
    ///
    /// # Errors
    /// The directory cannot be created or opened, the index does not open (another version's
    /// schema, corrupt files), or its writer lock is held by another process.
    pub fn open(dir: Option<&Path>) -> tantivy::Result<(Self, u64)> {
        let (schema, f) = schema();
        let index = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                Index::open_or_create(MmapDirectory::open(d)?, schema.clone())?
            }
            None => Index::create_in_ram(schema.clone()),
        };
        if index.schema() != schema {
            return Err(tantivy::TantivyError::SchemaError(
                "the index was written with another schema".to_owned(),
            ));
        }
        index
            .tokenizers()
            .register(tokenizer::NAME, tokenizer::ApexTokenizer);
        let applied = index
            .load_metas()?
            .payload
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let writer = index.writer_with_num_threads(1, WRITER_BYTES)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok((
            Self {
                reader,
                writer: Mutex::new(writer),
                f,
                on_disk: dir.is_some(),
            },
            applied,
        ))
    }

    /// Whether the index is on disk (else in RAM).
    pub fn on_disk(&self) -> bool {
        self.on_disk
    }

    /// Applies `ops` in order and commits them with `seq` as the payload; searches see them
    /// once this returns. Blocking (disk I/O): call it off the async workers.
    ///
    /// # Errors
    /// Tantivy's, when the commit fails; nothing of `ops` is visible then.
    pub fn apply(&self, ops: Vec<Op>, seq: u64) -> tantivy::Result<()> {
        let f = self.f;
        let mut w = self.writer.lock();
        for op in ops {
            match op {
                Op::Upsert(d) => {
                    w.delete_term(Term::from_field_text(f.key, &d.key));
                    let mut doc = TantivyDocument::new();
                    doc.add_text(f.key, &d.key);
                    doc.add_text(f.owner, &d.owner);
                    if let Some(sid) = &d.sid {
                        doc.add_text(f.session, session_term(&d.owner, sid));
                        doc.add_text(f.sid, sid);
                    }
                    doc.add_text(f.role, &d.role);
                    doc.add_i64(f.ts, d.ts_ms);
                    doc.add_text(f.text, &d.content);
                    if !d.extra.is_empty() {
                        doc.add_text(f.text, &d.extra);
                    }
                    doc.add_text(f.content, d.content);
                    if let Some(v) = d.vector {
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        doc.add_bytes(f.vec, &bytes);
                    }
                    w.add_document(doc)?;
                }
                Op::Delete(key) => {
                    w.delete_term(Term::from_field_text(f.key, &key));
                }
                Op::DropSession(s) => {
                    w.delete_term(Term::from_field_text(f.session, &s));
                }
            }
        }
        let mut commit = w.prepare_commit()?;
        commit.set_payload(&seq.to_string());
        commit.commit()?;
        drop(w);
        self.reader.reload()
    }

    /// Removes every document (the feed started over) and commits payload 0.
    ///
    /// # Errors
    /// Tantivy's.
    pub fn clear(&self) -> tantivy::Result<()> {
        let mut w = self.writer.lock();
        w.delete_all_documents()?;
        let mut commit = w.prepare_commit()?;
        commit.set_payload("0");
        commit.commit()?;
        drop(w);
        self.reader.reload()
    }

    /// Documents in the last reloaded commit.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// Whether the index holds no document.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The owner's documents matching any of the terms (and the session and time filters),
    /// best BM25 score first. An empty term list matches nothing.
    ///
    /// # Errors
    /// Tantivy's (a segment that cannot be read).
    pub fn search(&self, s: &Search<'_>) -> tantivy::Result<Vec<Hit>> {
        if s.terms.is_empty() || s.limit == 0 {
            return Ok(Vec::new());
        }
        let f = self.f;
        let any: Vec<(Occur, Box<dyn Query>)> = s
            .terms
            .iter()
            .map(|t| {
                let q: Box<dyn Query> = Box::new(TermQuery::new(
                    Term::from_field_text(f.text, t),
                    IndexRecordOption::WithFreqs,
                ));
                (Occur::Should, q)
            })
            .collect();
        let filter = |q: Box<dyn Query>| -> (Occur, Box<dyn Query>) {
            (Occur::Must, Box::new(ConstScoreQuery::new(q, 0.0)))
        };
        let exact = |field: Field, v: &str| -> Box<dyn Query> {
            Box::new(TermQuery::new(
                Term::from_field_text(field, v),
                IndexRecordOption::Basic,
            ))
        };
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![
            (Occur::Must, Box::new(BooleanQuery::new(any))),
            filter(exact(f.owner, s.owner)),
        ];
        if let Some(sess) = s.session {
            clauses.push(filter(exact(f.session, sess)));
        }
        if let Some(since) = s.since_ms {
            clauses.push(filter(Box::new(RangeQuery::new(
                Bound::Included(Term::from_field_i64(f.ts, since)),
                Bound::Unbounded,
            ))));
        }
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(s.limit).order_by_score())?;
        let mut out = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let doc: TantivyDocument = searcher.doc(addr)?;
            let text = |field: Field| {
                doc.get_first(field)
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            };
            // A document of another owner never matches the owner term; checked again here
            // so that no bug in a query can ever hand one out.
            let owner = text(f.owner);
            if owner.as_deref() != Some(s.owner) {
                continue;
            }
            out.push(Hit {
                score,
                key: text(f.key).unwrap_or_default(),
                sid: text(f.sid),
                role: text(f.role).unwrap_or_default(),
                ts_ms: doc.get_first(f.ts).and_then(|v| v.as_i64()).unwrap_or(0),
                content: text(f.content).unwrap_or_default(),
                vector: doc.get_first(f.vec).and_then(|v| v.as_bytes()).map(|b| {
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                }),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn msg(owner: &str, sid: &str, seq: u64, ts: i64, content: &str) -> Op {
        Op::Upsert(Doc {
            key: message_key(owner, sid, seq),
            owner: owner.to_owned(),
            sid: Some(sid.to_owned()),
            role: if seq % 2 == 1 { "user" } else { "assistant" }.to_owned(),
            ts_ms: ts,
            content: content.to_owned(),
            extra: String::new(),
            vector: None,
        })
    }

    fn find(ix: &MemoryIndex, owner: &str, q: &str) -> Vec<String> {
        let terms = tokenizer::query_terms(q);
        ix.search(&Search {
            owner,
            terms: &terms,
            session: None,
            since_ms: None,
            limit: 10,
        })
        .unwrap()
        .into_iter()
        .map(|h| h.content)
        .collect()
    }

    #[test]
    fn finds_by_word_and_never_across_owners() {
        let (ix, applied) = MemoryIndex::open(None).unwrap();
        assert_eq!(applied, 0);
        ix.apply(
            vec![
                msg("alice", "s1", 1, 10, "my locker code is zebra"),
                msg("alice", "s1", 2, 11, "noted"),
                msg("bob", "s1", 1, 12, "zebra crossing ahead"),
            ],
            3,
        )
        .unwrap();
        assert_eq!(find(&ix, "alice", "zebra"), ["my locker code is zebra"]);
        assert_eq!(find(&ix, "bob", "ZEBRA!"), ["zebra crossing ahead"]);
        assert!(find(&ix, "carol", "zebra").is_empty());
        assert!(find(&ix, "alice", "...").is_empty());
        // Any term may match; more matching terms rank higher.
        ix.apply(vec![msg("alice", "s2", 1, 13, "zebra locker")], 4)
            .unwrap();
        assert_eq!(
            find(&ix, "alice", "locker zebra"),
            ["zebra locker", "my locker code is zebra"]
        );
    }

    #[test]
    fn upserts_replace_deletes_remove_and_sessions_drop() {
        let (ix, _) = MemoryIndex::open(None).unwrap();
        ix.apply(
            vec![
                msg("a", "s", 1, 1, "apple pie"),
                msg("a", "s", 1, 1, "apple tart"),
            ],
            1,
        )
        .unwrap();
        assert_eq!(find(&ix, "a", "apple"), ["apple tart"]);
        ix.apply(
            vec![
                Op::Upsert(Doc {
                    key: memory_key("a", "mem_1"),
                    owner: "a".into(),
                    sid: None,
                    role: "memory".into(),
                    ts_ms: 5,
                    content: "likes apple juice".into(),
                    extra: "fruit".into(),
                    vector: Some(vec![0.5, 0.25]),
                }),
                msg("a", "t", 1, 2, "apple cider"),
            ],
            2,
        )
        .unwrap();
        let terms = vec!["fruit".to_owned()];
        let hits = ix
            .search(&Search {
                owner: "a",
                terms: &terms,
                session: None,
                since_ms: None,
                limit: 5,
            })
            .unwrap();
        assert_eq!(hits.len(), 1, "tags are searchable");
        assert_eq!(hits[0].sid, None);
        assert_eq!(hits[0].key, memory_key("a", "mem_1"));
        assert_eq!(hits[0].role, "memory");
        assert_eq!(hits[0].vector.as_deref(), Some(&[0.5f32, 0.25][..]));
        ix.apply(vec![Op::DropSession(session_term("a", "s"))], 3)
            .unwrap();
        assert_eq!(find(&ix, "a", "apple").len(), 2);
        ix.apply(vec![Op::Delete(memory_key("a", "mem_1"))], 4)
            .unwrap();
        assert_eq!(find(&ix, "a", "apple"), ["apple cider"]);
        ix.clear().unwrap();
        assert!(ix.is_empty());
    }

    #[test]
    fn session_and_since_filters() {
        let (ix, _) = MemoryIndex::open(None).unwrap();
        ix.apply(
            vec![
                msg("a", "s1", 1, 100, "kiwi one"),
                msg("a", "s2", 1, 200, "kiwi two"),
                msg("a", "s2", 3, 300, "kiwi three"),
            ],
            1,
        )
        .unwrap();
        let terms = vec!["kiwi".to_owned()];
        let s2 = session_term("a", "s2");
        let got = |session: Option<&str>, since_ms: Option<i64>| -> Vec<String> {
            let mut v: Vec<String> = ix
                .search(&Search {
                    owner: "a",
                    terms: &terms,
                    session,
                    since_ms,
                    limit: 10,
                })
                .unwrap()
                .into_iter()
                .map(|h| h.content)
                .collect();
            v.sort();
            v
        };
        assert_eq!(got(Some(&s2), None), ["kiwi three", "kiwi two"]);
        assert_eq!(got(None, Some(200)), ["kiwi three", "kiwi two"]);
        assert_eq!(got(Some(&s2), Some(250)), ["kiwi three"]);
        assert!(got(Some(&session_term("b", "s2")), None).is_empty());
    }

    #[test]
    fn cjk_text_is_found_by_words_and_characters() {
        let (ix, _) = MemoryIndex::open(None).unwrap();
        ix.apply(
            vec![
                msg("a", "s", 1, 1, "写一首关于春天的诗"),
                msg("a", "s", 2, 2, "今天天气很好"),
                msg("a", "s", 3, 3, "spring poem"),
            ],
            1,
        )
        .unwrap();
        assert_eq!(find(&ix, "a", "春天")[0], "写一首关于春天的诗");
        assert_eq!(find(&ix, "a", "诗"), ["写一首关于春天的诗"]);
        // "天气" is a bigram of the second message only; 天 alone is in both.
        assert_eq!(find(&ix, "a", "天气")[0], "今天天气很好");
    }

    #[test]
    fn the_commit_payload_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (ix, applied) = MemoryIndex::open(Some(dir.path())).unwrap();
            assert_eq!(applied, 0);
            assert!(ix.on_disk());
            ix.apply(vec![msg("a", "s", 1, 1, "durable words")], 41)
                .unwrap();
        }
        let (ix, applied) = MemoryIndex::open(Some(dir.path())).unwrap();
        assert_eq!(applied, 41);
        assert_eq!(find(&ix, "a", "durable"), ["durable words"]);
    }
}
