//! Where a CNI operation's time goes. Each phase of an ADD (lock wait, IPAM, netlink steps,
//! BPF attach, persisting, ...) runs inside a `debug` span of target [`TARGET`]; the root
//! span of the operation is [`operation`], a phase is [`phase`]. [`PhaseTimings`] is a
//! `tracing` layer that measures each phase's wall time and, when the operation ends, logs
//! one line with all of them:
//!
//! ```text
//! DEBUG contiv_agent::timing: ADD ctr1/eth0 total=4.213ms lock=0.004ms reserve=0.012ms ...
//! ```
//!
//! Enable it with `RUST_LOG=info,contiv_agent::timing=debug` (or `contiv_agent=debug`).
//! When the target is off the spans are disabled and cost a branch each.

use std::{fmt::Write as _, time::Instant};

use tracing::{
    Span, Subscriber,
    field::{Field, Visit},
    span,
};
use tracing_subscriber::{Layer, layer::Context, registry::LookupSpan};

/// The log target of the phase spans and of the per-operation timing line.
pub const TARGET: &str = "contiv_agent::timing";

/// The root span of one CNI operation: `op` is "ADD", "DEL", ...; `attachment` names it.
/// `plugin` holds what contiv-cni measured before its request arrived (see
/// [`PluginTiming`]); unknown values are left out of the line.
pub fn operation(op: &'static str, attachment: &str, plugin: PluginTiming) -> Span {
    tracing::debug_span!(target: TARGET, "cni_operation", op, attachment,
        plugin_start_to_connect_ms = plugin.start_to_connect_ms,
        plugin_connect_to_receipt_ms = plugin.connect_to_receipt_ms)
}

/// The plugin's side of an operation, from the timestamps it sends as request metadata
/// (`contiv_cni_api::plugin_timing`): its process start to a connected socket, and from
/// there to the agent's handler. NaN when not known.
#[derive(Debug, Clone, Copy)]
pub struct PluginTiming {
    pub start_to_connect_ms: f64,
    pub connect_to_receipt_ms: f64,
}

impl PluginTiming {
    /// From the request's metadata, measured against this process's clock now.
    pub fn from_metadata(md: &tonic::metadata::MetadataMap) -> Self {
        use contiv_cni_api::plugin_timing::{CONNECTED_NS, STARTED_NS, monotonic_ns};
        let now = monotonic_ns();
        let get = |key: &str| md.get(key).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        // A difference outside [0, 60 s] means the clocks are not comparable (another time
        // namespace): leave it out rather than log nonsense.
        let span_ms = |from: Option<u64>, to: Option<u64>| match (from, to) {
            (Some(a), Some(b)) if b >= a && b - a < 60_000_000_000 => (b - a) as f64 / 1e6,
            _ => f64::NAN,
        };
        let (started, connected) = (get(STARTED_NS), get(CONNECTED_NS));
        Self { start_to_connect_ms: span_ms(started, connected), connect_to_receipt_ms: span_ms(connected, Some(now)) }
    }
}

/// A phase of the current operation (a child span of it). A phase inside another phase is
/// reported as `outer.inner` (its time is part of the outer one's).
pub fn phase(name: &'static str) -> Span {
    // One callsite per name would need a macro; the phase name is a field instead.
    tracing::debug_span!(target: TARGET, "phase", phase = name)
}

/// When a span was created.
struct Started(Instant);

/// What the root span of an operation collects.
#[derive(Default)]
struct Operation {
    op: String,
    attachment: String,
    /// (phase, ms), in the order the phases ended.
    phases: Vec<(String, f64)>,
}

/// A phase span's name field.
struct PhaseName(String);

struct Fields<'a> {
    op: &'a mut Operation,
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "op" => self.op.op = value.to_owned(),
            "attachment" => self.op.attachment = value.to_owned(),
            _ => {}
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if let Some(name) = field.name().strip_suffix("_ms")
            && value.is_finite()
        {
            self.op.phases.push((name.to_owned(), value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "attachment" {
            self.op.attachment = format!("{value:?}");
        }
    }
}

struct NameField(Option<String>);

impl Visit for NameField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "phase" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "phase" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// The layer that turns phase spans into one timing line per operation.
pub struct PhaseTimings;

impl<S> Layer<S> for PhaseTimings
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if attrs.metadata().target() != TARGET {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        ext.insert(Started(Instant::now()));
        match attrs.metadata().name() {
            "cni_operation" => {
                let mut op = Operation::default();
                attrs.record(&mut Fields { op: &mut op });
                ext.insert(op);
            }
            _ => {
                let mut name = NameField(None);
                attrs.record(&mut name);
                ext.insert(PhaseName(name.0.unwrap_or_else(|| attrs.metadata().name().to_owned())));
            }
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        if span.metadata().target() != TARGET {
            return;
        }
        let Some(ms) = span.extensions().get::<Started>().map(|s| s.0.elapsed().as_secs_f64() * 1e3) else {
            return;
        };
        let finished = span.extensions_mut().remove::<Operation>();
        if let Some(op) = finished {
            drop(span);
            let mut line = format!("{} {} total={ms:.3}ms", op.op, op.attachment);
            for (name, ms) in &op.phases {
                let _ = write!(line, " {name}={ms:.3}ms");
            }
            tracing::debug!(target: TARGET, "{line}");
            return;
        }
        let Some(mut name) = span.extensions().get::<PhaseName>().map(|n| n.0.clone()) else { return };
        // The nearest enclosing operation collects the phase; phases in between prefix it.
        for ancestor in span.scope().skip(1) {
            if let Some(op) = ancestor.extensions_mut().get_mut::<Operation>() {
                op.phases.push((name, ms));
                return;
            }
            if let Some(outer) = ancestor.extensions().get::<PhaseName>() {
                name = format!("{}.{name}", outer.0);
            }
        }
    }
}
