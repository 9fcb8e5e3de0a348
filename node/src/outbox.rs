//! Task results waiting for the hub's `task_result_ack`: kept across reconnects and sent again
//! after every registration until acknowledged.

use std::collections::VecDeque;

use apex_protocol::TaskResult;

/// Most results held at once; beyond it the oldest is dropped (with a warning), so a hub that
/// never acknowledges cannot grow the node's memory without bound.
pub const MAX_PENDING: usize = 10_000;

#[derive(Debug)]
struct Pending {
    result: TaskResult,
    sent: bool,
}

/// Undelivered and unacknowledged task results, oldest first.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: VecDeque<Pending>,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a fresh result (not yet sent).
    pub fn push(&mut self, result: TaskResult) {
        if self.pending.len() >= MAX_PENDING
            && let Some(old) = self.pending.pop_front()
        {
            tracing::warn!(task_id = %old.result.task_id, "too many unacknowledged results; dropping the oldest");
        }
        self.pending.push_back(Pending {
            result,
            sent: false,
        });
    }

    /// Marks every result as not sent (a new connection starts).
    pub fn mark_all_unsent(&mut self) {
        for p in &mut self.pending {
            p.sent = false;
        }
    }

    /// Results not yet sent on the current connection, marked as sent now.
    pub fn take_unsent(&mut self) -> Vec<TaskResult> {
        self.pending
            .iter_mut()
            .filter(|p| !p.sent)
            .map(|p| {
                p.sent = true;
                p.result.clone()
            })
            .collect()
    }

    /// Removes the result a `task_result_ack` for `task_id` answers: the oldest sent one for that
    /// task (the hub answers in order). Returns whether one was removed.
    pub fn ack(&mut self, task_id: &str) -> bool {
        let idx = self
            .pending
            .iter()
            .position(|p| p.sent && p.result.task_id == task_id)
            .or_else(|| {
                self.pending
                    .iter()
                    .position(|p| p.result.task_id == task_id)
            });
        match idx {
            Some(i) => self.pending.remove(i).is_some(),
            None => false,
        }
    }

    /// Ids of the tasks whose results are held.
    pub fn task_ids(&self) -> impl Iterator<Item = &str> {
        self.pending.iter().map(|p| p.result.task_id.as_str())
    }

    /// Number of results held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str, attempt: u32) -> TaskResult {
        TaskResult {
            task_id: id.into(),
            attempt: Some(attempt),
            success: true,
            ..TaskResult::default()
        }
    }

    #[test]
    fn results_are_resent_until_acked() {
        let mut o = Outbox::new();
        o.push(result("a", 1));
        o.push(result("b", 1));
        assert_eq!(o.take_unsent().len(), 2);
        assert!(o.take_unsent().is_empty());
        assert!(o.ack("a"));
        assert!(!o.ack("zzz"));
        o.mark_all_unsent();
        let again = o.take_unsent();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].task_id, "b");
        assert_eq!(o.task_ids().collect::<Vec<_>>(), vec!["b"]);
    }

    #[test]
    fn ack_removes_the_oldest_sent_result_of_a_task() {
        let mut o = Outbox::new();
        o.push(result("a", 1));
        o.take_unsent();
        o.push(result("a", 2));
        assert!(o.ack("a"));
        let left = o.take_unsent();
        assert_eq!(left[0].attempt, Some(2));
    }
}
