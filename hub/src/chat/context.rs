//! The working context of a session: which of its newest messages fit the token budget
//! (`chat.context_max_tokens`). Pure: no I/O, no clock.
//!
//! The context is a suffix of the history. It may start only where no tool result is cut from
//! the assistant message that called it: never at a `tool` message, and never after an
//! assistant message whose calls are answered inside the suffix. Among those starts the
//! earliest whose messages, plus the fixed part (system prompt, summary), fit the budget wins.

/// A message as trimming sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// `user`, `assistant`, `system` or `tool`.
    pub role: String,
    /// Its tokens (text plus per-message overhead).
    pub tokens: u64,
    /// An assistant message's tool call ids.
    pub calls: Vec<String>,
    /// A tool message's `tool_call_id`.
    pub answers: Option<String>,
}

/// The index of the first message of the context: the earliest valid start (see the module
/// docs) whose suffix costs at most `budget - fixed` tokens. `None` when not even the last
/// message fits, or it cannot start a context (a tool result).
pub fn window_start(items: &[Item], fixed: u64, budget: u64) -> Option<usize> {
    let room = budget.checked_sub(fixed)?;
    let n = items.len();
    if n == 0 {
        return Some(0);
    }
    // For each start s: the earliest index a tool message at or after s refers to
    // (its call's position; an unanswerable result refers to before everything).
    let mut call_at = std::collections::HashMap::new();
    for (i, it) in items.iter().enumerate() {
        for c in &it.calls {
            call_at.insert(c.as_str(), i);
        }
    }
    let mut earliest_needed = vec![usize::MAX; n + 1];
    for s in (0..n).rev() {
        let here = match &items[s].answers {
            Some(id) if items[s].role == "tool" => match call_at.get(id.as_str()) {
                Some(&i) if i < s => i,
                _ => 0, // an orphan result: only a start before it… never valid at it
            },
            _ if items[s].role == "tool" => 0,
            _ => usize::MAX,
        };
        earliest_needed[s] = earliest_needed[s + 1].min(here);
    }
    let mut suffix = vec![0u64; n + 1];
    for s in (0..n).rev() {
        suffix[s] = suffix[s + 1].saturating_add(items[s].tokens);
    }
    (0..n).find(|&s| {
        items[s].role != "tool"
            && (earliest_needed[s] == usize::MAX || earliest_needed[s] >= s)
            && suffix[s] <= room
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn msg(role: &str, tokens: u64) -> Item {
        Item {
            role: role.to_owned(),
            tokens,
            calls: Vec::new(),
            answers: None,
        }
    }

    fn call(id: &str, tokens: u64) -> Item {
        Item {
            calls: vec![id.to_owned()],
            ..msg("assistant", tokens)
        }
    }

    fn result(id: &str, tokens: u64) -> Item {
        Item {
            answers: Some(id.to_owned()),
            ..msg("tool", tokens)
        }
    }

    #[test]
    fn keeps_everything_that_fits_and_drops_the_oldest() {
        let items = [msg("user", 10), msg("assistant", 10), msg("user", 10)];
        assert_eq!(window_start(&items, 5, 100), Some(0));
        assert_eq!(window_start(&items, 5, 25), Some(1));
        assert_eq!(window_start(&items, 5, 15), Some(2));
        assert_eq!(window_start(&items, 5, 14), None, "not even the last fits");
        assert_eq!(window_start(&[], 5, 10), Some(0));
        assert_eq!(window_start(&items, 50, 10), None, "fixed part over budget");
    }

    #[test]
    fn never_starts_between_a_call_and_its_result() {
        let items = [
            msg("user", 10),
            call("c1", 10),
            result("c1", 10),
            msg("assistant", 10),
            msg("user", 10),
        ];
        // 30 would fit from index 2 (a result) and from 3: 3 is the start.
        assert_eq!(window_start(&items, 0, 30), Some(3));
        assert_eq!(
            window_start(&items, 0, 40),
            Some(1),
            "call and result together"
        );
    }

    /// A history as the chat service writes it: turns of a user message, then optionally an
    /// assistant call with its results, then an assistant answer.
    fn history() -> impl Strategy<Value = Vec<Item>> {
        prop::collection::vec((1u64..50, 0usize..3, 1u64..50, 1u64..50), 0..30).prop_map(|turns| {
            let mut out = Vec::new();
            for (i, (u, calls, c, a)) in turns.into_iter().enumerate() {
                out.push(msg("user", u));
                if calls > 0 {
                    let ids: Vec<String> = (0..calls).map(|k| format!("t{i}-{k}")).collect();
                    out.push(Item {
                        calls: ids.clone(),
                        ..msg("assistant", c)
                    });
                    for id in ids {
                        out.push(result(&id, c));
                    }
                }
                out.push(msg("assistant", a));
            }
            out
        })
    }

    /// A start that cuts no result from its call (the definition, checked the slow way).
    fn valid_start(items: &[Item], s: usize) -> bool {
        items[s].role != "tool"
            && items[s..].iter().all(|i| {
                i.answers
                    .as_ref()
                    .is_none_or(|a| items[s..].iter().any(|c| c.calls.contains(a)))
            })
    }

    proptest! {
        #[test]
        fn trimming_keeps_calls_with_results_and_stays_within_budget(
            items in history(),
            fixed in 0u64..40,
            budget in 0u64..600,
        ) {
            match window_start(&items, fixed, budget) {
                Some(s) => {
                    let kept = &items[s..];
                    let cost: u64 = kept.iter().map(|i| i.tokens).sum::<u64>() + fixed;
                    prop_assert!(cost <= budget, "over budget: {cost} > {budget}");
                    if let Some(first) = kept.first() {
                        prop_assert_ne!(first.role.as_str(), "tool");
                    }
                    for (j, it) in kept.iter().enumerate() {
                        if let Some(id) = &it.answers {
                            prop_assert!(
                                kept[..j].iter().any(|c| c.calls.contains(id)),
                                "result {id} kept without its call"
                            );
                        }
                    }
                    // Earliest: no valid earlier start fits.
                    for e in 0..s {
                        let cost: u64 = items[e..].iter().map(|i| i.tokens).sum::<u64>() + fixed;
                        prop_assert!(!(valid_start(&items, e) && cost <= budget), "an earlier start {e} fits");
                    }
                }
                None => {
                    let last = items.last().map_or(0, |i| i.tokens);
                    prop_assert!(items.is_empty() || last + fixed > budget || fixed > budget
                        || items.iter().all(|i| i.role == "tool"),
                        "refused although the last message fits");
                }
            }
        }
    }
}
