//! Ranking of memory hits (pure): BM25 alone, or hybrid.
//!
//! Hybrid ranking re-ranks the BM25 candidates: each candidate's BM25 score is divided by the
//! best candidate's (so it is in 0..=1), its cosine similarity to the query's vector is clamped
//! to 0..=1 (a candidate without a vector, or with one of another length, has 0), and the score
//! is `(1 - w) * bm25 + w * cosine` with `w` = `memory.vector_weight`. Ties keep the newer
//! message first.

/// One candidate: what the index found and its vector, if it has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<T> {
    /// The BM25 score the index gave it.
    pub bm25: f32,
    /// When it was said or saved, Unix ms (ties: newer first).
    pub ts_ms: i64,
    /// Its embedding, if it was indexed with one.
    pub vector: Option<Vec<f32>>,
    /// The hit itself.
    pub item: T,
}

/// The cosine similarity of two vectors (0 when either is zero or their lengths differ).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// The best `limit` candidates with their scores, best first: by BM25 when `query` is `None`
/// (the score is the BM25 score), else hybrid (see the module docs; the score is the blend).
pub fn rank<T>(
    mut candidates: Vec<Candidate<T>>,
    query: Option<&[f32]>,
    weight: f32,
    limit: usize,
) -> Vec<(f32, T)> {
    let Some(q) = query else {
        candidates.sort_by(|a, b| b.bm25.total_cmp(&a.bm25).then(b.ts_ms.cmp(&a.ts_ms)));
        return candidates
            .into_iter()
            .take(limit)
            .map(|c| (c.bm25, c.item))
            .collect();
    };
    let best = candidates
        .iter()
        .map(|c| c.bm25)
        .fold(0f32, f32::max)
        .max(f32::MIN_POSITIVE);
    let w = weight.clamp(0.0, 1.0);
    let mut scored: Vec<(f32, i64, T)> = candidates
        .into_iter()
        .map(|c| {
            let cos = c
                .vector
                .as_deref()
                .map_or(0.0, |v| cosine(q, v).clamp(0.0, 1.0));
            let s = (1.0 - w) * (c.bm25 / best).clamp(0.0, 1.0) + w * cos;
            (s, c.ts_ms, c.item)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
    scored
        .into_iter()
        .take(limit)
        .map(|(s, _, item)| (s, item))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(
        bm25: f32,
        ts_ms: i64,
        vector: Option<Vec<f32>>,
        item: &'static str,
    ) -> Candidate<&'static str> {
        Candidate {
            bm25,
            ts_ms,
            vector,
            item,
        }
    }

    #[test]
    fn cosine_of_parallel_orthogonal_and_odd_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert!((cosine(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[1.0], &[1.0, 0.0]), 0.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn bm25_alone_orders_by_score_then_newest_and_cuts_at_the_limit() {
        let got = rank(
            vec![
                c(1.0, 1, None, "a"),
                c(3.0, 1, None, "b"),
                c(1.0, 5, None, "c"),
            ],
            None,
            0.5,
            2,
        );
        assert_eq!(got, [(3.0, "b"), (1.0, "c")]);
    }

    #[test]
    fn hybrid_blends_normalised_bm25_with_cosine() {
        let q = [1.0, 0.0];
        let cands = || {
            vec![
                // Best lexical match, unrelated meaning.
                c(4.0, 1, Some(vec![0.0, 1.0]), "lexical"),
                // Weaker lexical match, same meaning.
                c(2.0, 1, Some(vec![1.0, 0.0]), "semantic"),
                // No vector: only its BM25 share counts.
                c(3.0, 1, None, "plain"),
            ]
        };
        // Weight 0 is BM25 order (scores normalised).
        let got = rank(cands(), Some(&q), 0.0, 3);
        assert_eq!(
            got.iter().map(|x| x.1).collect::<Vec<_>>(),
            ["lexical", "plain", "semantic"]
        );
        assert!((got[0].0 - 1.0).abs() < 1e-6);
        // Weight 1 is cosine order; a candidate without a vector scores 0.
        let got = rank(cands(), Some(&q), 1.0, 3);
        assert_eq!(got[0], (1.0, "semantic"));
        // Half and half: semantic 0.5*0.5 + 0.5*1 = 0.75 beats lexical 0.5*1 + 0 = 0.5.
        let got = rank(cands(), Some(&q), 0.5, 3);
        assert_eq!(
            got.iter().map(|x| x.1).collect::<Vec<_>>(),
            ["semantic", "lexical", "plain"]
        );
        assert!((got[0].0 - 0.75).abs() < 1e-6);
        // Negative similarity counts as none, never below the BM25 share.
        let got = rank(
            vec![c(1.0, 1, Some(vec![-1.0, 0.0]), "opposite")],
            Some(&q),
            0.5,
            1,
        );
        assert!((got[0].0 - 0.5).abs() < 1e-6);
    }
}
