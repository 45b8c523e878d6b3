// Package control is the running server's control socket: a small HTTP+JSON
// API on a unix socket (`--control unix:PATH`) and its client, used by
// `nbdcache stats`, `nbdcache flush --drain`, `nbdcache mode` and the fault
// commands of `nbdcache ctl`.
//
// Endpoints (all JSON; errors are {"error": "..."} with a 4xx/5xx status):
//
//	GET  /v1/stats                 one Stats snapshot
//	POST /v1/drain                 write back everything and sync the backing;
//	                               streams Progress lines (NDJSON), the last
//	                               one with done == total, or an error line
//	POST /v1/mode?mode=M           switch the cache mode (leaving writeback drains first)
//	GET  /v1/fault                 fault mode's state (registered by the daemon)
//	POST /v1/fault/power-cut       cut the power: drop what the loss model drops, recover
//	POST /v1/fault/error           inject (or clear) errors on the export, cache or backing
//	POST /v1/fault/delay           inject (or clear) latency on the cache or backing
//
// Stats field names are an interface that users and tests rely on: add
// fields, never rename them. Every counter the process keeps is gathered into
// Stats in one place (the Target's Stats method), which is also what a
// metrics endpoint exports.
//
// Who may use it: the socket is created 0600 (0660 with a group, Access),
// never looser even for an instant (unixsock.Listen), and every
// connection's peer, as the kernel recorded it (SO_PEERCRED,
// SO_PEERGROUPS), must be the server's user, root or a member of that
// group; anyone else gets 403 before any endpoint runs, even if the
// socket's mode was loosened. The API is as powerful as write access to
// the disk (power cuts, injected errors, mode switches).
//
// The package knows nothing of caching or NBD: the daemon hands it a Target.
package control
