//! The order a destination accepts the transfer in (no I/O): rootfs passes
//! and image rounds may interleave, but
//!
//! ```text
//!   rootfs records ........ until the frozen pass's RootfsEnd
//!   RoundBegin(n) ......... n = last closed round + 1; a pre-dump round
//!                           at most the announced limit; one open at a time
//!   ImageData ............. only inside an open round
//!   ImagesDone ............ closes the open round; the final round only
//!                           after the frozen rootfs pass (its check runs
//!                           while the images arrive)
//! ```
//!
//! and it keeps which earlier round each new pre-dump round's images lean
//! on (their `parent` link): round 1 for as long as each later round was
//! folded into it, else the round before. Anything out of this order is
//! the sender's fault (`bad-stream`).

use crate::{RoundBegin, RoundKind};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("rootfs records after the frozen pass")]
    RootfsAfterFrozenPass,
    #[error("round {0} out of order")]
    RoundOutOfOrder(u32),
    #[error("round {round} exceeds the announced {limit}")]
    TooManyRounds { round: u32, limit: u32 },
    #[error("image data outside a round")]
    ImageOutsideRound,
    #[error("ImagesDone outside a round")]
    DoneOutsideRound,
    #[error("the final images came before the frozen rootfs pass")]
    FinalBeforeFrozenPass,
}

/// Where a transfer stands.
#[derive(Debug, Clone)]
pub struct TransferOrder {
    /// Most pre-dump rounds the manifest announced (and the protocol allows).
    limit: u32,
    frozen_pass_done: bool,
    open: Option<RoundBegin>,
    last_closed: u32,
    parent: u32,
    folding: bool,
}

impl TransferOrder {
    pub fn new(pre_dump_limit: u32) -> Self {
        Self { limit: pre_dump_limit, frozen_pass_done: false, open: None, last_closed: 0, parent: 1, folding: true }
    }

    /// A rootfs record may come.
    pub fn rootfs_record(&self) -> Result<(), TransferError> {
        if self.frozen_pass_done {
            return Err(TransferError::RootfsAfterFrozenPass);
        }
        Ok(())
    }

    /// The frozen pass ended.
    pub fn frozen_pass_ended(&mut self) {
        self.frozen_pass_done = true;
    }

    /// A round opens; returns the round its images lean on, if any.
    pub fn begin_round(&mut self, begin: RoundBegin) -> Result<Option<u32>, TransferError> {
        if self.open.is_some() || begin.round != self.last_closed + 1 {
            return Err(TransferError::RoundOutOfOrder(begin.round));
        }
        if begin.kind == RoundKind::PreDump && begin.round > self.limit {
            return Err(TransferError::TooManyRounds { round: begin.round, limit: self.limit });
        }
        self.open = Some(begin);
        Ok((begin.round > 1).then_some(self.parent))
    }

    /// Image data may come.
    pub fn image_data(&self) -> Result<(), TransferError> {
        self.open.map(|_| ()).ok_or(TransferError::ImageOutsideRound)
    }

    /// The open round closes (its images verified by the caller).
    pub fn end_round(&mut self) -> Result<RoundBegin, TransferError> {
        let begin = self.open.ok_or(TransferError::DoneOutsideRound)?;
        if begin.kind == RoundKind::Final && !self.frozen_pass_done {
            return Err(TransferError::FinalBeforeFrozenPass);
        }
        self.open = None;
        self.last_closed = begin.round;
        if begin.kind == RoundKind::PreDump {
            self.parent = begin.round;
        }
        Ok(begin)
    }

    /// Whether pre-dump round `round`, just closed, is to be folded into
    /// round 1 (only while every round before it was).
    pub fn wants_fold(&self, round: u32) -> bool {
        round > 1 && self.folding
    }

    /// What folding round `round` did: folded, later rounds lean on round
    /// 1; not, they lean on the round before and no later one folds.
    pub fn folded(&mut self, round: u32, folded: bool) {
        self.folding = folded;
        self.parent = if folded { 1 } else { round };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(round: u32) -> RoundBegin {
        RoundBegin { round, kind: RoundKind::PreDump }
    }

    fn fin(round: u32) -> RoundBegin {
        RoundBegin { round, kind: RoundKind::Final }
    }

    #[test]
    fn a_stop_copy_transfer() {
        let mut t = TransferOrder::new(0);
        t.rootfs_record().unwrap();
        t.frozen_pass_ended();
        assert_eq!(t.rootfs_record(), Err(TransferError::RootfsAfterFrozenPass));
        assert_eq!(t.begin_round(fin(1)), Ok(None));
        t.image_data().unwrap();
        assert_eq!(t.end_round(), Ok(fin(1)));
    }

    #[test]
    fn pre_dump_rounds_lean_on_round_one_while_they_fold() {
        let mut t = TransferOrder::new(8);
        assert_eq!(t.begin_round(pre(1)), Ok(None));
        t.end_round().unwrap();
        assert!(!t.wants_fold(1));
        assert_eq!(t.begin_round(pre(2)), Ok(Some(1)));
        t.end_round().unwrap();
        assert!(t.wants_fold(2));
        t.folded(2, true);
        assert_eq!(t.begin_round(pre(3)), Ok(Some(1)));
        t.end_round().unwrap();
        t.folded(3, false);
        assert!(!t.wants_fold(4), "no folding after a round that did not fold");
        assert_eq!(t.begin_round(pre(4)), Ok(Some(3)));
        t.end_round().unwrap();
        t.frozen_pass_ended();
        assert_eq!(t.begin_round(fin(5)), Ok(Some(4)));
        t.end_round().unwrap();
    }

    #[test]
    fn out_of_order_streams_are_refused() {
        let mut t = TransferOrder::new(2);
        assert_eq!(t.begin_round(pre(2)), Err(TransferError::RoundOutOfOrder(2)));
        assert_eq!(t.image_data(), Err(TransferError::ImageOutsideRound));
        assert_eq!(t.end_round(), Err(TransferError::DoneOutsideRound));
        t.begin_round(pre(1)).unwrap();
        assert_eq!(t.begin_round(pre(2)), Err(TransferError::RoundOutOfOrder(2)), "one round open at a time");
        t.end_round().unwrap();
        t.begin_round(pre(2)).unwrap();
        t.end_round().unwrap();
        assert_eq!(t.begin_round(pre(3)), Err(TransferError::TooManyRounds { round: 3, limit: 2 }));
        t.begin_round(fin(3)).unwrap();
        assert_eq!(t.end_round(), Err(TransferError::FinalBeforeFrozenPass));
    }
}
