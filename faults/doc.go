// Package faults is fault mode (`serve --faults`): power cuts, injected
// errors and latency on the export and on each real device, driven
// through the control socket by `nbdcache ctl`. The wrappers themselves
// (Volatile, Gate, Switch, Faulty, Delay) live in package storage; this
// package builds the chains, orchestrates a cut and the recovery after
// it, and reports both.
//
// With --faults each real device gets this chain, built once:
//
//	cache.Cache ─▶ Gate ─▶ Faulty ─▶ Delay ─▶ [Slow] ─▶ Switch ─▶ Volatile ─▶ File
//	               per power-on  persistent: faults and delays outlive a cut  per power-on
//
// and the export (what the NBD server sees) gets
//
//	nbd.Server ─▶ [DurableAcks] ─▶ Faulty ─▶ Delay ─▶ Switch ─▶ cache.Cache (or the backing's Gate)
//
// A power cut, in this order:
//  1. the export switch holds new requests (a client that reconnects waits);
//  2. every client connection is dropped: no request in flight is answered
//     from here on, so everything acknowledged was complete before the cut;
//  3. storage.CutVolatile marks both Volatile wrappers dead at one instant
//     (the power failure: a flush in flight then covers nothing), waits for
//     their calls in flight, undoes unsynced writes per the model and syncs
//     the files;
//  4. the generation's Gate closes, waiting for the calls still inside the
//     chains (a request sleeping in a Delay): the old Cache (its writeback,
//     its journal) can no longer reach any device, now or later;
//  5. power on: new Volatile wrappers in the chains' Switches, a new Gate,
//     cache.Check and cache.Open (recovery, as at a real start);
//  6. the export switch points at the new Cache and lets requests go; the
//     old Cache is closed in the background (its calls all fail, its log
//     is muted).
//
// `power-cut --off` stops after step 4: the export switch points at a
// dead device (every request fails with EIO, as a disk without power
// does) until `power-on` runs steps 5 and 6. That is how a filesystem
// mounted on /dev/nbdX is taken down with its disk: it sees errors, not
// a disk that silently went back in time under it.
//
// Without --faults none of this exists: no wrapper, no cost.
package faults
