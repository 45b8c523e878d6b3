// Package metrics exports the server's statistics in the Prometheus
// exposition format.
//
// Invariants:
//   - Nothing is copied or counted twice: the counters live where they
//     are produced (cache.Stats, nbd.Stats, writeback.Stats), and the
//     collector reads a snapshot of each at scrape time. Every numeric
//     or boolean field of those structs is a metric, by reflection, so
//     a stat added there is exported without a change here
//     (TestEveryStatIsAMetric).
//   - Names follow Prometheus' rules: nbdcache_<source>_<field in
//     snake case>; counters end in _total, sizes in _bytes (before
//     _total). The fields that are levels, not counts, are listed in
//     gauges; every other integer is a counter.
//   - Per-request metrics (latency histograms by command, errors by
//     command and errno) come from nbd.Observer, on the request's
//     goroutine: one histogram observation per request.
package metrics
