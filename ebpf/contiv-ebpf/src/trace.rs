//! Trace mode: `netctl trace` asks the agent, which runs `tc_from_pod` itself on a packet it
//! made up (`BPF_PROG_TEST_RUN`), so the answer comes from the code that forwards real
//! packets; a packet it sends to another node is then run through that node's
//! `tc_from_overlay` the same way. A run is in trace mode when `skb->mark` is [`TRACE_MARK`] and
//! `skb->ingress_ifindex` is 0: every packet that really arrives on an interface has that
//! interface as its ingress ifindex, and a pod's marks are scrubbed as its packets cross
//! into the node's namespace, so no pod can ask for trace mode.
//!
//! In trace mode the program records each decision in `TRACE_STEPS` (per CPU; the record
//! carries the run's `cb[0]` so the agent finds it) and changes no state: no conntrack entry
//! is written or refreshed, no affinity entry, no counter, no monitor event. The packet it
//! rewrites is the test run's own copy, and a redirect is only a return code there.
//!
//! On the fast path a trace check is one load of `skb->mark` and a compare (a few per packet);
//! in every program but `tc_from_pod` it is a null pointer the compiler removes.

use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use contiv_common::{TRACE_MARK, TraceStep};

use crate::maps::TRACE_STEPS;

/// The packet a program runs on, when it may be a trace (`tc_from_pod`); null otherwise.
///
/// Whether it is one is read from the packet each time it matters (a volatile load of
/// `skb->mark`): the verifier then never carries "this run is a trace" through the whole
/// program, and explores the trace branches once each instead of the program twice.
#[derive(Clone, Copy)]
pub struct Trace {
    skb: *mut __sk_buff,
}

impl Trace {
    /// Never a trace (every program but `tc_from_pod`).
    pub const OFF: Trace = Trace { skb: core::ptr::null_mut() };

    /// The run's trace handle; a trace starts its record here.
    #[inline(always)]
    pub fn of(ctx: &TcContext) -> Trace {
        let t = Trace { skb: ctx.skb.skb };
        if t.on()
            && let Some(rec) = TRACE_STEPS.get_ptr_mut(0)
        {
            // SAFETY: this CPU's slot of a per-CPU map (the agent runs one trace at a time);
            // a context field read.
            unsafe {
                (*rec).nonce = (*t.skb).cb[0];
                (*rec).count = 0;
            }
        }
        t
    }

    /// Whether this run is a trace: then nothing may be written but the record.
    #[inline(always)]
    pub fn on(&self) -> bool {
        if self.skb.is_null() {
            return false;
        }
        // SAFETY: the context is valid for the program's run; plain field reads.
        let mark = unsafe { core::ptr::read_volatile(&raw const (*self.skb).mark) };
        // SAFETY: as above.
        mark == TRACE_MARK && unsafe { core::ptr::read_volatile(&raw const (*self.skb).ingress_ifindex) } == 0
    }

    /// In a trace of `tc_from_overlay`: the sending node the agent put in `cb[1]` (a test
    /// run carries no tunnel key); `None` for real packets.
    #[inline(always)]
    pub fn sender(&self) -> Option<[u8; 4]> {
        if !self.on() {
            return None;
        }
        // SAFETY: the context is valid for the program's run; a field read.
        Some(unsafe { (*self.skb).cb[1] }.to_ne_bytes())
    }

    /// Records a step (see `contiv_common::trace_step` for the fields). Only `skb->mark`
    /// is looked at here: recording into the trace record is harmless even for a packet
    /// that only carried the mark (none can), and one compare keeps the many steps cheap.
    #[inline(always)]
    pub fn step(&self, code: u16, arg: u16, ip: [u8; 4], port: u16, aux: u16, value: u32) {
        if self.skb.is_null() {
            return;
        }
        // SAFETY: the context is valid for the program's run; a plain field read.
        if unsafe { core::ptr::read_volatile(&raw const (*self.skb).mark) } != TRACE_MARK {
            return;
        }
        contiv_trace_record(
            u32::from(code) | u32::from(arg) << 16,
            u32::from_ne_bytes(ip),
            u32::from(port) | u32::from(aux) << 16,
            value,
        );
    }

    /// Records a step with only a code and its argument.
    #[inline(always)]
    pub fn note(&self, code: u16, arg: u16) {
        self.step(code, arg, [0; 4], 0, 0, 0);
    }
}

/// Appends a step to this CPU's trace record, as the four words of a [`TraceStep`] (bpfel:
/// each word's first field is its low half). A global function: the verifier checks it
/// once, not at each of the many places a trace records a step.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn contiv_trace_record(code_arg: u32, ip: u32, port_aux: u32, value: u32) -> u32 {
    let Some(rec) = TRACE_STEPS.get_ptr_mut(0) else { return 0 };
    // SAFETY: this CPU's slot of a per-CPU map (the agent runs one trace at a time).
    let rec = unsafe { &mut *rec };
    let n = rec.count as usize;
    if let Some(s) = rec.steps.get_mut(n) {
        let p = (s as *mut TraceStep).cast::<u32>();
        // SAFETY: a TraceStep is four u32s' worth of u16/u32 fields, 4-aligned. Plain
        // stores: a struct store could become a call to memset.
        unsafe {
            core::ptr::write_volatile(p, code_arg);
            core::ptr::write_volatile(p.add(1), ip);
            core::ptr::write_volatile(p.add(2), port_aux);
            core::ptr::write_volatile(p.add(3), value);
        }
        rec.count = n as u32 + 1;
    }
    0
}
