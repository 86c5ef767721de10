//! What the operator tools need of the datapath: handles on the monitor's maps for the
//! agent's reader, the monitor's counters, and trace runs of `tc_from_pod` and
//! `tc_from_overlay`: the loaded programs themselves, run by the kernel on a made-up packet
//! (`BPF_PROG_TEST_RUN`) in trace mode (see `ebpf/contiv-ebpf/src/trace.rs`), which records
//! its decisions and writes nothing.

use std::os::fd::AsFd;

use aya::{
    maps::{Map, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{SchedClassifier, TcAttachType, TestRun, TestRunOptions},
};
use contiv_common::{MonitorBucket, TRACE_MARK, TraceRecord, TraceStep, map_names, monitor_bucket, program_names};

use super::{Datapath, DatapathError, Result, map_err, prog_err};

/// The monitor's maps, on file descriptors of their own (the reader task owns them).
pub struct MonitorMaps {
    pub events: RingBuf<MapData>,
    pub rate: PerCpuArray<MapData, MonitorBucket>,
}

/// The monitor buckets' counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitorCounters {
    /// Events written to the ring buffer.
    pub emitted: u64,
    /// Events over the rate: not written (the packets were handled as usual).
    pub suppressed: u64,
    /// Events the ring buffer had no room for.
    pub lost: u64,
}

/// What one trace run gave.
#[derive(Debug, Clone)]
pub struct TraceRun {
    /// The program's return code (TC_ACT_*).
    pub return_code: u32,
    /// The packet as the program left it.
    pub packet_out: Vec<u8>,
    /// The decisions it recorded, in order.
    pub steps: Vec<TraceStep>,
    /// The id of the program that ran.
    pub program_id: u32,
}

fn io_err(name: &'static str, e: std::io::Error) -> DatapathError {
    DatapathError::Map { name, source: aya::maps::MapError::IoError(e) }
}

/// A map of its own fd (a duplicate of the datapath's).
fn own(map: &MapData, name: &'static str) -> Result<MapData> {
    let fd = map.fd().as_fd().try_clone_to_owned().map_err(|e| io_err(name, e))?;
    MapData::from_fd(fd).map_err(map_err(name))
}

impl Datapath {
    fn map_data(&self, name: &'static str) -> Result<&MapData> {
        match self.ebpf.map(name).ok_or(DatapathError::Missing(name))? {
            Map::RingBuf(m) | Map::PerCpuArray(m) => Ok(m),
            _ => Err(DatapathError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } }),
        }
    }

    /// Handles on MONITOR_EVENTS and MONITOR_RATE for the monitor's reader.
    pub fn monitor_maps(&self) -> Result<MonitorMaps> {
        let events = own(self.map_data(map_names::MONITOR_EVENTS)?, map_names::MONITOR_EVENTS)?;
        let rate = own(self.map_data(map_names::MONITOR_RATE)?, map_names::MONITOR_RATE)?;
        Ok(MonitorMaps {
            events: RingBuf::try_from(Map::RingBuf(events)).map_err(map_err(map_names::MONITOR_EVENTS))?,
            rate: PerCpuArray::try_from(Map::PerCpuArray(rate)).map_err(map_err(map_names::MONITOR_RATE))?,
        })
    }

    /// The id of the loaded `tc_from_pod` (the one attached to pod interfaces).
    pub fn from_pod_program_id(&self) -> Result<u32> {
        let name = program_names::FROM_POD;
        let prog: &SchedClassifier =
            self.ebpf.program(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(prog_err(name))?;
        Ok(prog.info().map_err(prog_err(name))?.id())
    }

    /// Runs `tc_from_pod` in trace mode on `packet` as if it arrived on `ifindex`; the
    /// record of the run is found by `nonce` among the CPUs'. The caller serialises traces.
    pub fn trace_from_pod(&mut self, ifindex: u32, packet: &[u8], nonce: u32) -> Result<TraceRun> {
        self.trace_run(program_names::FROM_POD, ifindex, packet, nonce, 0)
    }

    /// Runs `tc_from_overlay` in trace mode on `packet` (an inner frame) as if it arrived on
    /// the overlay device `ifindex` from the node `sender`.
    pub fn trace_from_overlay(&mut self, ifindex: u32, packet: &[u8], sender: [u8; 4], nonce: u32) -> Result<TraceRun> {
        self.trace_run(program_names::FROM_OVERLAY, ifindex, packet, nonce, u32::from_ne_bytes(sender))
    }

    fn trace_run(&mut self, name: &'static str, ifindex: u32, packet: &[u8], nonce: u32, cb1: u32) -> Result<TraceRun> {
        // Every CPU's record cleared first: the one carrying the nonce afterwards is this run's.
        {
            let nr_cpus = self.nr_cpus;
            let mut records: PerCpuArray<&mut MapData, TraceRecord> = self.typed(map_names::TRACE_STEPS)?;
            let blank = PerCpuValues::try_from(vec![TraceRecord::default(); nr_cpus])
                .map_err(|e| io_err(map_names::TRACE_STEPS, e))?;
            records.set(0, blank, 0).map_err(map_err(map_names::TRACE_STEPS))?;
        }
        let prog: &SchedClassifier =
            self.ebpf.program(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(prog_err(name))?;
        let program_id = prog.info().map_err(prog_err(name))?.id();
        let ctx = trace_context(ifindex, nonce, cb1);
        let mut out = vec![0u8; packet.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: 1,
                ..Default::default()
            })
            .map_err(prog_err(name))?;
        out.truncate((result.data_size_out as usize).min(out.len()));
        let records: PerCpuArray<&MapData, TraceRecord> = self.typed_ref(map_names::TRACE_STEPS)?;
        let values = records.get(&0, 0).map_err(map_err(map_names::TRACE_STEPS))?;
        let rec = values.iter().find(|r| r.nonce == nonce).ok_or_else(|| {
            io_err(map_names::TRACE_STEPS, std::io::Error::other("the run left no trace record (not in trace mode?)"))
        })?;
        let n = (rec.count as usize).min(rec.steps.len());
        Ok(TraceRun { return_code: result.return_value, packet_out: out, steps: rec.steps[..n].to_vec(), program_id })
    }

    /// The monitor's counters per bucket (drops, flows), summed over CPUs.
    pub fn monitor_counters(&self) -> Result<[MonitorCounters; monitor_bucket::COUNT as usize]> {
        let map: PerCpuArray<&MapData, MonitorBucket> = self.typed_ref(map_names::MONITOR_RATE)?;
        sum_buckets(|i| map.get(&i, 0).map(|v| v.iter().copied().collect()).map_err(map_err(map_names::MONITOR_RATE)))
    }
}

/// The `struct __sk_buff` a trace run starts from (its first 17 fields, through `cb`; the
/// kernel zeroes the rest): `mark` [`TRACE_MARK`], `ifindex` the interface it arrives on
/// (the kernel makes it the skb's device), `cb[0]` the nonce, `cb[1]` the sending node of an
/// overlay trace; `ingress_ifindex` stays 0.
fn trace_context(ifindex: u32, nonce: u32, cb1: u32) -> Vec<u8> {
    // Offsets in u32s (include/uapi/linux/bpf.h): len, pkt_type, mark, queue_mapping,
    // protocol, vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex, ifindex,
    // tc_index, cb[5].
    const MARK: usize = 2;
    const IFINDEX: usize = 10;
    const CB0: usize = 12;
    let mut ctx = [0u32; 17];
    ctx[MARK] = TRACE_MARK;
    ctx[IFINDEX] = ifindex;
    ctx[CB0] = nonce;
    ctx[CB0 + 1] = cb1;
    ctx.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// Sums per-CPU buckets into counters, bucket by bucket.
pub fn sum_buckets(
    mut get: impl FnMut(u32) -> Result<Vec<MonitorBucket>>,
) -> Result<[MonitorCounters; monitor_bucket::COUNT as usize]> {
    let mut out = [MonitorCounters::default(); monitor_bucket::COUNT as usize];
    for (i, c) in out.iter_mut().enumerate() {
        for b in get(i as u32)? {
            c.emitted += b.emitted;
            c.suppressed += b.suppressed;
            c.lost += b.lost;
        }
    }
    Ok(out)
}

/// The ids of the programs attached to an interface's tcx ingress.
pub fn tcx_ingress_programs(ifname: &str) -> Result<Vec<u32>> {
    let name = "tcx query";
    let (_, progs) = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress).map_err(prog_err(name))?;
    Ok(progs.iter().map(|p| p.id()).collect())
}
