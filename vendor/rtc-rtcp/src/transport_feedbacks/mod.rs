/// RFC 8888 congestion control feedback: per-packet arrival, ECN and arrival-time offsets.
pub mod cc_feedback_report;
/// RRR: asks a sender to resynchronize as quickly as it can.
pub mod rapid_resynchronization_request;
/// Transport-wide congestion control feedback: per-packet arrival status and deltas.
pub mod transport_layer_cc;
/// Generic NACK, which lists sequence numbers the receiver did not get.
pub mod transport_layer_nack;
