//! Engine tests (written next).
