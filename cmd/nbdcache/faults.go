package main

// faults.go: fault mode (`serve --faults`): power cuts, injected errors
// and latency, driven through the control socket by `nbdcache ctl`; and
// durable acknowledgements (`--sync always`). The wrappers themselves
// (Gate, Switch, DurableAcks) live in package storage.
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

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/control"
	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/storage"
)

// errFaultsOff answers the fault endpoints of a server started without
// --faults.
var errFaultsOff = fmt.Errorf("%w: fault mode is off: start the server with `nbdcache serve --faults --control unix:PATH`", control.ErrBadRequest)

// ---------------------------------------------------------------------
// the rig

// knobs are the injected errors and latency of one target: a Delay with a
// Faulty on top. They outlive every power cut.
type knobs struct {
	faulty *storage.Faulty
	delay  *storage.Delay
}

// newKnobs wraps d and returns the knobs with the device to use above them.
func newKnobs(d storage.Device) (knobs, storage.Device) {
	k := knobs{delay: storage.NewDelay(d)}
	k.faulty = storage.NewFaulty(k.delay, rand.Uint64())
	return k, k.faulty
}

// faultChain is one real device with its fault-mode wrappers.
type faultChain struct {
	knobs
	name string
	file storage.Device  // the real device: outlives every cut
	slot *storage.Switch // holds the current Volatile
	top  storage.Device  // what a generation's Gate wraps
	vol  *storage.Volatile
}

// faultRig holds fault mode's state for one server.
type faultRig struct {
	log     *slog.Logger
	maxUndo int64
	back    *faultChain
	cache   *faultChain // nil without --cache

	exportKnobs knobs
	export      *storage.Switch
	srv         atomic.Pointer[nbd.Server]

	mu struct {
		sync.Mutex
		gen    *storage.Gate // the current power-on
		cache  *cache.Cache  // the current one; nil without --cache
		mute   *atomic.Bool  // mutes the current cache's log
		opts   cache.Options
		mode   cache.Mode // the cache's mode at the last cut
		cuts   int
		off    bool                   // power-cut --off, until powerOn
		faults map[string][]faultSpec // installed, per target
	}
}

func newFaultRig(log *slog.Logger) *faultRig {
	r := &faultRig{log: log, maxUndo: storage.DefaultMaxUndo}
	r.mu.gen = storage.NewGate()
	r.mu.faults = make(map[string][]faultSpec)
	return r
}

// chain builds the persistent wrappers over a real device. model, if not
// nil, sits between the delays and the volatile cache (the disk model).
func (r *faultRig) chain(name string, file storage.Device, model func(storage.Device) storage.Device) *faultChain {
	c := &faultChain{name: name, file: file}
	c.vol = storage.NewVolatile(file, storage.VolatileOptions{MaxUndo: r.maxUndo})
	c.slot = storage.NewSwitch(c.vol)
	var d storage.Device = c.slot
	if model != nil {
		d = model(d)
	}
	c.knobs, c.top = newKnobs(d)
	return c
}

// wrapBacking returns the backing as the first generation sees it.
func (r *faultRig) wrapBacking(file storage.Device, model func(storage.Device) storage.Device) storage.Device {
	r.back = r.chain("backing", file, model)
	return r.mu.gen.Wrap(r.back.top)
}

// wrapCache returns the cache device as the first generation sees it.
func (r *faultRig) wrapCache(file storage.Device) storage.Device {
	r.cache = r.chain("cache", file, nil)
	return r.mu.gen.Wrap(r.cache.top)
}

// setCache records the open cache and the options to reopen it with.
func (r *faultRig) setCache(c *cache.Cache, opts cache.Options) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.mu.cache, r.mu.opts = c, opts
}

// cacheLogger returns the logger for the first cache.
func (r *faultRig) cacheLogger() *slog.Logger {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cacheLoggerLocked()
}

// cacheLoggerLocked returns a logger for a new cache that the next cut
// mutes.
func (r *faultRig) cacheLoggerLocked() *slog.Logger {
	r.mu.mute = new(atomic.Bool)
	return slog.New(muteHandler{inner: r.log.Handler(), muted: r.mu.mute})
}

// muteHandler drops every record once muted.
type muteHandler struct {
	inner slog.Handler
	muted *atomic.Bool
}

func (h muteHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return !h.muted.Load() && h.inner.Enabled(ctx, l)
}

func (h muteHandler) Handle(ctx context.Context, rec slog.Record) error {
	if h.muted.Load() {
		return nil
	}
	return h.inner.Handle(ctx, rec)
}

func (h muteHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return muteHandler{inner: h.inner.WithAttrs(as), muted: h.muted}
}

func (h muteHandler) WithGroup(name string) slog.Handler {
	return muteHandler{inner: h.inner.WithGroup(name), muted: h.muted}
}

// wrapExport returns what the NBD server serves.
func (r *faultRig) wrapExport(dev storage.Device) storage.Device {
	r.export = storage.NewSwitch(dev)
	k, top := newKnobs(r.export)
	r.exportKnobs = k
	return top
}

// currentCache is the cache serving now (nil without --cache).
func (r *faultRig) currentCache() *cache.Cache {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.mu.cache
}

// closeCache closes the current cache (at shutdown).
func (r *faultRig) closeCache() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mu.cache == nil {
		return nil
	}
	err := r.mu.cache.Close()
	r.mu.cache = nil
	return err
}

// liveCache is the cache serving now: fault mode swaps it at every cut.
func (o *openedStorage) liveCache() *cache.Cache {
	if o.rig != nil {
		return o.rig.currentCache()
	}
	return o.cache
}

// finishExport wraps the device to serve as the flags ask: the fault
// mode's export layers, then durable acknowledgements.
func (o *openedStorage) finishExport(f *storageFlags) {
	if o.rig != nil {
		o.dev = o.rig.wrapExport(o.dev)
	}
	if f.syncMode == "always" {
		o.dev = storage.NewDurableAcks(o.dev)
	}
}

// parseSyncMode checks --sync.
func parseSyncMode(s string) error {
	switch s {
	case "normal", "always":
		return nil
	}
	return fmt.Errorf("%w: --sync %q: want normal or always", errUsage, s)
}

// namedModel is a loss model as `power-cut --model` names it.
type namedModel struct {
	name  string
	model storage.LossModel
}

func lossModelNames() []namedModel {
	return []namedModel{
		{"unflushed", storage.LoseUnsynced},
		{"random", storage.LoseRandom},
		{"torn", storage.LoseTorn},
		{"keep", storage.KeepUnsynced},
	}
}

func parseLossModel(s string) (storage.LossModel, error) {
	for _, m := range lossModelNames() {
		if s == m.name {
			return m.model, nil
		}
	}
	return 0, fmt.Errorf("%w: model %q: want unflushed, random, torn or keep", control.ErrBadRequest, s)
}

func lossModelName(m storage.LossModel) string {
	for _, n := range lossModelNames() {
		if n.model == m {
			return n.name
		}
	}
	return m.String()
}

// maxUndoneShown bounds the undone ranges a power-cut report lists.
const maxUndoneShown = 32

// deviceLoss is what a cut did to one device (JSON for ctl).
type deviceLoss struct {
	Device       string  `json:"device"`
	Entries      int     `json:"unsynced_writes"`
	Dropped      int     `json:"dropped"`
	Kept         int     `json:"kept"`
	Partial      int     `json:"partly_dropped"`
	BytesDropped int64   `json:"bytes_dropped"`
	BytesKept    int64   `json:"bytes_kept"`
	Torn         []int64 `json:"torn_sectors,omitempty"`
	Garbage      []int64 `json:"garbage_sectors,omitempty"`
	// Undone: the first maxUndoneShown byte ranges the cut undid, as
	// [offset, length]; UndoneMore counts the rest.
	Undone       [][2]int64 `json:"undone,omitempty"`
	UndoneMore   int        `json:"undone_more,omitempty"`
	Overflows    int64      `json:"early_flushes"`
	WriteThrough int64      `json:"written_through"`
}

// checkResult is cache.Check's verdict on the devices after the cut.
type checkResult struct {
	OK               bool     `json:"ok"`
	Error            string   `json:"error,omitempty"`
	State            string   `json:"state"`
	SuperblockCopies int      `json:"superblock_copies"`
	CheckpointsValid int      `json:"checkpoints_valid"`
	JournalBlocks    int64    `json:"journal_blocks"`
	JournalStop      string   `json:"journal_stop,omitempty"`
	Replayed         int64    `json:"replayed_records"`
	Dropped          int64    `json:"dropped_records"`
	Extents          int64    `json:"extents"`
	DirtyBytes       int64    `json:"dirty_bytes"`
	Problems         []string `json:"problems,omitempty"`
	Warnings         []string `json:"warnings,omitempty"`
}

// recoveryResult is what the reopened cache reports.
type recoveryResult struct {
	Mode            string `json:"mode"`
	ReplayedRecords int64  `json:"replayed_records"`
	ReplayDropped   int64  `json:"dropped_records"`
	Extents         int64  `json:"extents"`
	DirtyBytes      int64  `json:"dirty_bytes"`
}

// powerCutResult is the answer to POST /v1/fault/power-cut.
type powerCutResult struct {
	Cut         int             `json:"cut"` // 1 for the server's first cut
	Model       string          `json:"model"`
	Seed        uint64          `json:"seed"`
	Connections int             `json:"connections_dropped"`
	Devices     []deviceLoss    `json:"devices"`
	Check       *checkResult    `json:"check,omitempty"`
	Recovery    *recoveryResult `json:"recovery,omitempty"`
	Error       string          `json:"error,omitempty"`       // the cut or the power-on failed
	PoweredOff  bool            `json:"powered_off,omitempty"` // power-cut --off: no Check or Recovery yet
	Millis      float64         `json:"millis"`
}

// errPowerOff and errPowerOn refuse a cut while the power is off and a
// power-on while it is on.
var (
	errPowerOff = fmt.Errorf("%w: the power is off: `nbdcache ctl power-on` first", control.ErrBadRequest)
	errPowerOn  = fmt.Errorf("%w: the power is on", control.ErrBadRequest)
)

// powerCut cuts the power under model and, unless stayOff, powers the
// devices on again. With stayOff every request fails with EIO, as on a
// disk without power, until powerOn.
func (r *faultRig) powerCut(model storage.LossModel, seed uint64, stayOff bool) (powerCutResult, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mu.off {
		return powerCutResult{}, errPowerOff
	}
	start := time.Now()
	r.mu.cuts++
	res := powerCutResult{Cut: r.mu.cuts, Model: lossModelName(model), Seed: seed}

	// 1-2: hold the export, drop the clients.
	r.export.Hold()
	if srv := r.srv.Load(); srv != nil {
		res.Connections = srv.DropConnections()
	}
	if r.mu.mute != nil {
		r.mu.mute.Store(true) // what the old cache says from now on is noise
	}

	// 3: the loss itself, on every device at one instant.
	chains := r.chains()
	vols := make([]*storage.Volatile, len(chains))
	for i, c := range chains {
		vols[i] = c.vol
	}
	rng := rand.New(rand.NewPCG(seed, seed^0x2545f4914f6cdd1d))
	reps, err := storage.CutVolatile(model, rng, vols...)
	for i, rep := range reps {
		d := deviceLoss{
			Device: chains[i].name, Entries: rep.Entries, Dropped: rep.Dropped, Kept: rep.Kept, Partial: rep.Partial,
			BytesDropped: rep.BytesDropped, BytesKept: rep.BytesKept, Torn: rep.Torn, Garbage: rep.Garbage,
			Overflows: rep.Overflows, WriteThrough: rep.WriteThrough,
		}
		for j, u := range rep.Undone {
			if j == maxUndoneShown {
				d.UndoneMore = len(rep.Undone) - j
				break
			}
			d.Undone = append(d.Undone, [2]int64{u.Off, u.Len})
		}
		res.Devices = append(res.Devices, d)
	}
	if err != nil {
		res.Error = err.Error()
	}
	// 4: nothing of the old generation reaches the devices any more.
	r.mu.gen.Close()
	old := r.mu.cache
	if old != nil {
		r.mu.mode = old.Mode()
	}
	r.mu.cache = nil

	if stayOff {
		r.mu.off = true
		res.PoweredOff = true
		drained := r.export.Release(storage.NewDead(r.export.Size(), r.export.Caps(),
			fmt.Errorf("%w: fault mode: the power is off (`nbdcache ctl power-on`)", unix.EIO)))
		if old != nil {
			go r.abandon(old, drained)
		}
	} else {
		r.powerOnLocked(&res, old)
	}
	res.Millis = float64(time.Since(start).Microseconds()) / 1000
	r.log.Info("fault mode: power cut", "cut", res.Cut, "model", res.Model, "seed", seed,
		"connections", res.Connections, "off", stayOff, "millis", res.Millis, "error", res.Error)
	return res, nil
}

// powerOn ends a power-off that `power-cut --off` began: recovery runs
// and the export serves the state after the cut.
func (r *faultRig) powerOn() (powerCutResult, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.mu.off {
		return powerCutResult{}, errPowerOn
	}
	start := time.Now()
	res := powerCutResult{Cut: r.mu.cuts}
	r.export.Hold()
	r.mu.off = false
	r.powerOnLocked(&res, nil)
	res.Millis = float64(time.Since(start).Microseconds()) / 1000
	r.log.Info("fault mode: power on", "cut", res.Cut, "millis", res.Millis, "error", res.Error)
	return res, nil
}

// chains are the real devices: the cache's (if any), then the backing's.
func (r *faultRig) chains() []*faultChain {
	if r.cache != nil {
		return []*faultChain{r.cache, r.back}
	}
	return []*faultChain{r.back}
}

// powerOnLocked is steps 5 and 6 of a cut: fresh Volatile wrappers and
// Gate, cache.Check and cache.Open, and the export switched to the new
// state (held until then). old, if not nil, is the cache that served
// before, closed in the background once its requests are gone.
func (r *faultRig) powerOnLocked(res *powerCutResult, old *cache.Cache) {
	for _, c := range r.chains() {
		c.vol = storage.NewVolatile(c.file, storage.VolatileOptions{MaxUndo: r.maxUndo})
		c.slot.Release(c.vol)
	}
	r.mu.gen = storage.NewGate()
	bd := r.mu.gen.Wrap(r.back.top)
	var next storage.Device = bd
	if r.cache != nil {
		cd := r.mu.gen.Wrap(r.cache.top)
		rep, cerr := cache.Check(cd, bd)
		res.Check = &checkResult{
			OK: cerr == nil, State: rep.State, SuperblockCopies: rep.SuperblockCopies, CheckpointsValid: rep.CheckpointsValid,
			JournalBlocks: rep.JournalBlocks, JournalStop: rep.JournalStop, Replayed: rep.Replayed, Dropped: rep.Dropped,
			Extents: rep.Extents, DirtyBytes: rep.DirtyBytes, Problems: rep.Problems, Warnings: rep.Warnings,
		}
		if cerr != nil {
			res.Check.Error = cerr.Error()
		}
		opts := r.mu.opts
		opts.Mode = r.mu.mode
		opts.Logger = r.cacheLoggerLocked()
		c, oerr := cache.Open(cd, bd, opts)
		if oerr != nil {
			oerr = fmt.Errorf("powering on: opening the cache: %w", oerr)
			res.Error = cmp.Or(res.Error, oerr.Error())
			r.log.Error("fault mode: the cache did not come back after the power cut; every request fails", "err", oerr)
			next = storage.NewDead(r.export.Size(), r.export.Caps(), fmt.Errorf("%w: %w", unix.EIO, oerr))
		} else {
			s := c.Stats()
			res.Recovery = &recoveryResult{Mode: s.Mode.String(), ReplayedRecords: s.ReplayedRecords,
				ReplayDropped: s.ReplayDropped, Extents: s.Extents, DirtyBytes: s.DirtyBytes}
			next = c
			r.mu.cache = c
		}
	}
	drained := r.export.Release(next)
	if old != nil {
		go r.abandon(old, drained)
	}
}

// abandon closes a cache whose power was cut, once the requests that were
// in it have returned (they fail: its devices are gone). Its errors mean
// nothing.
func (r *faultRig) abandon(c *cache.Cache, drained func()) {
	done := make(chan struct{})
	go func() {
		drained()
		close(done)
	}()
	t := time.NewTimer(time.Minute)
	defer t.Stop()
	select {
	case <-done:
		c.Close()
	case <-t.C:
		r.log.Warn("fault mode: requests are still stuck in the cache from before the power cut; not closing it")
	}
}

// ---------------------------------------------------------------------
// errors and delays

// faultSpec is one installed fault, as ctl shows it.
type faultSpec struct {
	Ops         string  `json:"ops"`
	Errno       string  `json:"errno"`
	Offset      int64   `json:"offset"`
	Length      int64   `json:"length"` // 0: the whole device
	Probability float64 `json:"probability,omitempty"`
	After       int64   `json:"after,omitempty"`
	Times       int64   `json:"times,omitempty"`
	fault       storage.Fault
}

// wireErrnos are the errors an NBD reply can carry; injecting any other
// would reach the client as one of these, not as asked.
type namedErrno struct {
	name  string
	errno unix.Errno
}

func wireErrnos() []namedErrno {
	return []namedErrno{
		{"EIO", unix.EIO}, {"EPERM", unix.EPERM}, {"ENOSPC", unix.ENOSPC}, {"EINVAL", unix.EINVAL},
		{"ENOMEM", unix.ENOMEM}, {"EOVERFLOW", unix.EOVERFLOW}, {"ENOTSUP", unix.ENOTSUP}, {"ESHUTDOWN", unix.ESHUTDOWN},
	}
}

func parseErrno(s string) (unix.Errno, error) {
	if s == "" {
		return unix.EIO, nil
	}
	u := strings.ToUpper(s)
	if u == "EOPNOTSUPP" {
		u = "ENOTSUP"
	}
	var names []string
	for _, e := range wireErrnos() {
		if u == e.name {
			return e.errno, nil
		}
		names = append(names, e.name)
	}
	return 0, fmt.Errorf("%w: errno %q: NBD carries only %s", control.ErrBadRequest, s, strings.Join(names, ", "))
}

func errnoName(e error) string {
	for _, w := range wireErrnos() {
		if errors.Is(e, w.errno) {
			return w.name
		}
	}
	return fmt.Sprint(e)
}

type namedOp struct {
	name string
	kind storage.OpKind
}

// opNames are the kinds `--op` takes; "all" comes last.
func opNames() []namedOp {
	return []namedOp{
		{"read", storage.OpRead}, {"write", storage.OpWrite}, {"flush", storage.OpFlush},
		{"trim", storage.OpTrim}, {"zero", storage.OpZero}, {"extents", storage.OpExtents}, {"all", storage.OpAll},
	}
}

// parseOps reads "read,write" (empty: every kind).
func parseOps(s string) (storage.OpKind, error) {
	if s == "" {
		return storage.OpAll, nil
	}
	var k storage.OpKind
	for _, part := range strings.Split(s, ",") {
		found := false
		for _, o := range opNames() {
			if strings.TrimSpace(part) == o.name {
				k |= o.kind
				found = true
			}
		}
		if !found {
			return 0, fmt.Errorf("%w: op %q: want read, write, flush, trim, zero, extents or all", control.ErrBadRequest, part)
		}
	}
	return k, nil
}

// targets returns the targets a request names ("" or "all": every one).
func (r *faultRig) targets(name string, export bool) ([]string, error) {
	all := []string{"backing"}
	if r.cache != nil {
		all = []string{"cache", "backing"}
	}
	if export {
		all = append([]string{"export"}, all...)
	}
	if name == "" || name == "all" {
		return all, nil
	}
	if !slices.Contains(all, name) {
		return nil, fmt.Errorf("%w: target %q: want one of %s", control.ErrBadRequest, name, strings.Join(all, ", "))
	}
	return []string{name}, nil
}

// knobsOf returns the knobs of a target that targets accepted.
func (r *faultRig) knobsOf(target string) *knobs {
	switch target {
	case "export":
		return &r.exportKnobs
	case "cache":
		return &r.cache.knobs
	}
	return &r.back.knobs
}

// faultStatus is the answer to GET /v1/fault and to the error and delay
// endpoints.
type faultStatus struct {
	Cuts    int                    `json:"power_cuts"`
	Off     bool                   `json:"powered_off"`
	Faults  map[string][]faultSpec `json:"faults"`
	Failed  map[string]int64       `json:"injected"`         // requests failed so far, per target
	Delays  map[string]string      `json:"delays,omitempty"` // "read=5ms,write=5ms", per target
	Pending map[string]int64       `json:"unsynced_bytes"`   // what a cut may drop now, per device
}

func (r *faultRig) status() faultStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := faultStatus{Cuts: r.mu.cuts, Off: r.mu.off, Faults: map[string][]faultSpec{}, Failed: map[string]int64{},
		Delays: map[string]string{}, Pending: map[string]int64{}}
	ts, _ := r.targets("", true)
	for _, t := range ts {
		if fs := r.mu.faults[t]; len(fs) > 0 {
			st.Faults[t] = fs
		}
		st.Failed[t] = r.knobsOf(t).faulty.Injected()
		var parts []string
		for _, o := range opNames()[:6] {
			if l := r.knobsOf(t).delay.Latency(o.kind); l > 0 {
				parts = append(parts, o.name+"="+l.String())
			}
		}
		if len(parts) > 0 {
			st.Delays[t] = strings.Join(parts, ",")
		}
	}
	for _, c := range []*faultChain{r.cache, r.back} {
		if c != nil {
			st.Pending[c.name] = c.vol.Stats().UnsyncedBytes
		}
	}
	return st
}

func queryInt(q url.Values, key string) (int64, error) {
	s := q.Get(key)
	if s == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 0, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%w: %s=%q: want a number >= 0", control.ErrBadRequest, key, s)
	}
	return n, nil
}

// knobRequest parses what error and delay requests share: the targets
// (every one, for clear), and for a setting its single target and the
// operations it applies to.
func (r *faultRig) knobRequest(q url.Values) (ts []string, clear bool, ops storage.OpKind, err error) {
	if ts, err = r.targets(q.Get("target"), true); err != nil {
		return nil, false, 0, err
	}
	if q.Get("clear") != "" {
		return ts, true, 0, nil
	}
	if len(ts) != 1 {
		return nil, false, 0, fmt.Errorf("%w: --target export, cache or backing is required", control.ErrBadRequest)
	}
	ops, err = parseOps(q.Get("op"))
	return ts, false, ops, err
}

// setError installs (or, with clear, removes) an injected error.
func (r *faultRig) setError(q url.Values) error {
	ts, clear, ops, err := r.knobRequest(q)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if clear {
		for _, t := range ts {
			r.knobsOf(t).faulty.Clear()
			delete(r.mu.faults, t)
		}
		return nil
	}
	errno, err := parseErrno(q.Get("errno"))
	if err != nil {
		return err
	}
	var spec faultSpec
	if spec.Offset, err = queryInt(q, "offset"); err != nil {
		return err
	}
	if spec.Length, err = queryInt(q, "length"); err != nil {
		return err
	}
	if spec.After, err = queryInt(q, "after"); err != nil {
		return err
	}
	if spec.Times, err = queryInt(q, "times"); err != nil {
		return err
	}
	if p := q.Get("probability"); p != "" {
		v, err := strconv.ParseFloat(p, 64)
		if err != nil || v <= 0 || v > 1 {
			return fmt.Errorf("%w: probability %q: want a number in (0, 1]", control.ErrBadRequest, p)
		}
		spec.Probability = v
	}
	size := r.export.Size()
	if ts[0] != "export" {
		size = r.knobsOf(ts[0]).faulty.Size()
	}
	if spec.Offset >= size || spec.Length > size-spec.Offset {
		return fmt.Errorf("%w: range %d+%d is outside the %s (%d bytes)", control.ErrBadRequest, spec.Offset, spec.Length, ts[0], size)
	}
	if ops == storage.OpFlush && (spec.Offset > 0 || spec.Length > 0) {
		return fmt.Errorf("%w: a flush has no range, so a flush fault with --offset or --length would never fire", control.ErrBadRequest)
	}
	if spec.Length == 0 && spec.Offset > 0 {
		spec.Length = size - spec.Offset
	}
	spec.Ops, spec.Errno = ops.String(), errnoName(errno)
	spec.fault = storage.Fault{Ops: ops, Off: spec.Offset, Length: spec.Length, Prob: spec.Probability,
		After: spec.After, Times: spec.Times, Err: errno}
	t := ts[0]
	r.mu.faults[t] = append(r.mu.faults[t], spec)
	var all []storage.Fault
	for _, s := range r.mu.faults[t] {
		all = append(all, s.fault)
	}
	r.knobsOf(t).faulty.SetFaults(all...)
	return nil
}

// setDelay sets (or, with clear, removes) latency.
func (r *faultRig) setDelay(q url.Values) error {
	ts, clear, ops, err := r.knobRequest(q)
	if err != nil {
		return err
	}
	if clear {
		for _, t := range ts {
			r.knobsOf(t).delay.Clear()
		}
		return nil
	}
	lat, err := time.ParseDuration(q.Get("latency"))
	if err != nil || lat < 0 || lat > time.Minute {
		return fmt.Errorf("%w: latency %q: want a duration such as 5ms, at most 1m", control.ErrBadRequest, q.Get("latency"))
	}
	r.knobsOf(ts[0]).delay.Set(ops, lat)
	return nil
}

// registerFaultEndpoints adds the fault API to the control handler; r is
// nil without --faults, and the endpoints then say so.
//
//	GET  /v1/fault                          faultStatus
//	POST /v1/fault/power-cut?model=&seed=&off=   powerCutResult (off=1: the power stays off)
//	POST /v1/fault/power-on                      powerCutResult (after off=1)
//	POST /v1/fault/error?target=&op=&errno=&offset=&length=&probability=&after=&times=  (or clear=1)
//	POST /v1/fault/delay?target=&op=&latency=                                           (or clear=1)
func registerFaultEndpoints(h http.Handler, r *faultRig) {
	control.Register(h, "GET /v1/fault", func(w http.ResponseWriter, req *http.Request) {
		if r == nil {
			control.WriteError(w, errFaultsOff)
			return
		}
		control.WriteJSON(w, r.status())
	})
	control.Register(h, "POST /v1/fault/power-cut", func(w http.ResponseWriter, req *http.Request) {
		if r == nil {
			control.WriteError(w, errFaultsOff)
			return
		}
		q := req.URL.Query()
		model := storage.LoseUnsynced
		if m := q.Get("model"); m != "" {
			var err error
			if model, err = parseLossModel(m); err != nil {
				control.WriteError(w, err)
				return
			}
		}
		seed := rand.Uint64()
		if s := q.Get("seed"); s != "" {
			v, err := strconv.ParseUint(s, 0, 64)
			if err != nil {
				control.WriteError(w, fmt.Errorf("%w: seed %q", control.ErrBadRequest, s))
				return
			}
			seed = v
		}
		res, err := r.powerCut(model, seed, q.Get("off") != "")
		if err != nil {
			control.WriteError(w, err)
			return
		}
		control.WriteJSON(w, res)
	})
	control.Register(h, "POST /v1/fault/power-on", func(w http.ResponseWriter, req *http.Request) {
		if r == nil {
			control.WriteError(w, errFaultsOff)
			return
		}
		res, err := r.powerOn()
		if err != nil {
			control.WriteError(w, err)
			return
		}
		control.WriteJSON(w, res)
	})
	// setter answers a request that changes the injected faults with the
	// fault state that results.
	setter := func(set func(*faultRig, url.Values) error) http.HandlerFunc {
		return func(w http.ResponseWriter, req *http.Request) {
			if r == nil {
				control.WriteError(w, errFaultsOff)
				return
			}
			if err := set(r, req.URL.Query()); err != nil {
				control.WriteError(w, err)
				return
			}
			control.WriteJSON(w, r.status())
		}
	}
	control.Register(h, "POST /v1/fault/error", setter((*faultRig).setError))
	control.Register(h, "POST /v1/fault/delay", setter((*faultRig).setDelay))
}
