//! `task_stream` chunks: subscriptions of streamed tasks (node-hosted chat calls), fenced like
//! results, and the `toolArgs.resume` of a re-assigned stream.

use super::*;

/// One `task_stream` chunk handed to a stream subscriber ([`Cluster::submit_streaming`]).
#[derive(Debug, Clone)]
pub struct StreamChunk {
    /// The attempt the chunk belongs to (a higher one means the task moved to another node).
    pub attempt: u32,
    /// Position within the attempt, from 0, as the node numbered it.
    pub seq: u64,
    /// The chunk object.
    pub chunk: Value,
}

/// Computes `toolArgs.resume` of a task's re-assignment (attempt > 1); see
/// [`Cluster::set_resume`].
pub type ResumeFn = Arc<dyn Fn() -> Option<Value> + Send + Sync>;

impl Cluster {
    /// Handles `task_stream`: hands the chunk to the task's stream subscriber if it belongs to
    /// the task's current node and attempt (fenced like a result). Returns whether it was
    /// delivered.
    pub fn task_stream(&self, node_id: &str, s: TaskStream) -> bool {
        let attempt = {
            let core = self.shared.core.lock();
            if fence(&core, &s.task_id, node_id, s.attempt).is_err() {
                return false;
            }
            match core.store.get(&s.task_id) {
                Some(t) => t.attempt,
                None => return false,
            }
        };
        let streams = self.shared.streams.lock();
        match streams.get(&s.task_id) {
            Some(tx) => tx
                .send(StreamChunk {
                    attempt,
                    seq: s.seq,
                    chunk: s.chunk,
                })
                .is_ok(),
            None => false,
        }
    }

    /// Submits one task and subscribes to its `task_stream` chunks, in order and with their
    /// attempt, before any can arrive. The channel is unbounded (chunks are never dropped
    /// for a slow reader); [`Cluster::close_stream`] ends the subscription.
    ///
    /// # Errors
    /// As [`Cluster::submit`].
    pub fn submit_streaming(
        &self,
        spec: TaskSpec,
    ) -> Result<(Task, mpsc::UnboundedReceiver<StreamChunk>), SubmitError> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Held across the submit so that no chunk of the new task finds no subscriber.
        let mut streams = self.shared.streams.lock();
        let mut accepted = self.submit(vec![spec])?;
        let Some((task, _)) = accepted.pop() else {
            return Err(SubmitError::UnknownNode("no task was accepted".to_owned()));
        };
        streams.insert(task.id.clone(), tx);
        Ok((task, rx))
    }

    /// Sets how `toolArgs.resume` is computed when task `task_id` is assigned again after a
    /// migration (attempt > 1): the value `f` returns, if any, is added to the arguments.
    pub fn set_resume(&self, task_id: &str, f: ResumeFn) {
        self.shared.core.lock().resume.insert(task_id.to_owned(), f);
    }

    /// Ends a stream subscription and forgets the task's resume maker; cancels the task if it
    /// has not ended (the subscriber went away).
    pub fn close_stream(&self, task_id: &str) {
        self.shared.streams.lock().remove(task_id);
        self.shared.core.lock().resume.remove(task_id);
        let _ = self.cancel(task_id);
    }
}
