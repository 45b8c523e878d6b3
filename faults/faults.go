package faults

// faults.go: Rig, fault mode's state: the device chains, power cuts and
// recovery, and the error and delay knobs.

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

// ErrOff answers the fault endpoints of a server started without
// --faults.
var ErrOff = fmt.Errorf("%w: fault mode is off: start the server with `nbdcache serve --faults --control unix:PATH`", control.ErrBadRequest)

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
	slot *storage.Switch // holds the current Volatile (the file itself for a remote)
	top  storage.Device  // what a generation's Gate wraps
	vol  *storage.Volatile
	// remote: the device is another machine's (an NBD backing), which
	// keeps its own power: no Volatile, and a cut leaves it alone.
	remote bool
}

// Rig holds fault mode's state for one server.
type Rig struct {
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
		off    bool              // power-cut --off, until powerOn
		faults map[string][]Spec // installed, per target
	}
}

func New(log *slog.Logger) *Rig {
	r := &Rig{log: log, maxUndo: storage.DefaultMaxUndo}
	r.mu.gen = storage.NewGate()
	r.mu.faults = make(map[string][]Spec)
	return r
}

// chain builds the persistent wrappers over a real device. model, if not
// nil, sits between the delays and the volatile cache (the disk model).
func (r *Rig) chain(name string, file storage.Device, remote bool, model func(storage.Device) storage.Device) *faultChain {
	c := &faultChain{name: name, file: file, remote: remote}
	if remote {
		c.slot = storage.NewSwitch(file)
	} else {
		c.vol = storage.NewVolatile(file, storage.VolatileOptions{MaxUndo: r.maxUndo})
		c.slot = storage.NewSwitch(c.vol)
	}
	var d storage.Device = c.slot
	if model != nil {
		d = model(d)
	}
	c.knobs, c.top = newKnobs(d)
	return c
}

// WrapBacking returns the backing as the first generation sees it. A
// remote backing (remote: an NBD export) is another machine, with power
// of its own: errors and delays reach it, power cuts do not. Its outages
// are the remote's own (kill the NBD server).
func (r *Rig) WrapBacking(file storage.Device, remote bool, model func(storage.Device) storage.Device) storage.Device {
	r.back = r.chain("backing", file, remote, model)
	return r.mu.gen.Wrap(r.back.top)
}

// WrapCache returns the cache device as the first generation sees it.
func (r *Rig) WrapCache(file storage.Device) storage.Device {
	r.cache = r.chain("cache", file, false, nil)
	return r.mu.gen.Wrap(r.cache.top)
}

// SetCache records the open cache and the options to reopen it with.
func (r *Rig) SetCache(c *cache.Cache, opts cache.Options) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.mu.cache, r.mu.opts = c, opts
}

// CacheLogger returns the logger for the first cache.
func (r *Rig) CacheLogger() *slog.Logger {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cacheLoggerLocked()
}

// cacheLoggerLocked returns a logger for a new cache that the next cut
// mutes.
func (r *Rig) cacheLoggerLocked() *slog.Logger {
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

// WrapExport returns what the NBD server serves.
func (r *Rig) WrapExport(dev storage.Device) storage.Device {
	r.export = storage.NewSwitch(dev)
	k, top := newKnobs(r.export)
	r.exportKnobs = k
	return top
}

// SetServer names the NBD server whose connections a power cut drops.
func (r *Rig) SetServer(srv *nbd.Server) { r.srv.Store(srv) }

// CurrentCache is the cache serving now (nil without --cache).
func (r *Rig) CurrentCache() *cache.Cache {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.mu.cache
}

// CloseCache closes the current cache (at shutdown).
func (r *Rig) CloseCache() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mu.cache == nil {
		return nil
	}
	err := r.mu.cache.Close()
	r.mu.cache = nil
	return err
}

// NamedModel is a loss model as `power-cut --model` names it.
type NamedModel struct {
	Name  string
	Model storage.LossModel
}

func LossModelNames() []NamedModel {
	return []NamedModel{
		{"unflushed", storage.LoseUnsynced},
		{"random", storage.LoseRandom},
		{"torn", storage.LoseTorn},
		{"keep", storage.KeepUnsynced},
	}
}

func ParseLossModel(s string) (storage.LossModel, error) {
	for _, m := range LossModelNames() {
		if s == m.Name {
			return m.Model, nil
		}
	}
	return 0, fmt.Errorf("%w: model %q: want unflushed, random, torn or keep", control.ErrBadRequest, s)
}

func LossModelName(m storage.LossModel) string {
	for _, n := range LossModelNames() {
		if n.Model == m {
			return n.Name
		}
	}
	return m.String()
}

// maxUndoneShown bounds the undone ranges a power-cut report lists.
const maxUndoneShown = 32

// DeviceLoss is what a cut did to one device (JSON for ctl).
type DeviceLoss struct {
	Device       string `json:"device"`
	Entries      int    `json:"unsynced_writes"`
	Dropped      int    `json:"dropped"`
	Kept         int    `json:"kept"`
	Partial      int    `json:"partly_dropped"`
	BytesDropped int64  `json:"bytes_dropped"`
	BytesKept    int64  `json:"bytes_kept"`
	// Torn holds the first byte of the torn write that the tear dropped,
	// Garbage the offset of the sector filled with random bytes (the torn
	// model; at most one each, see storage.LossModel).
	Torn    []int64 `json:"torn_sectors,omitempty"`
	Garbage []int64 `json:"garbage_sectors,omitempty"`
	// Undone: the first maxUndoneShown byte ranges the cut undid, as
	// [offset, length]; UndoneMore counts the rest.
	Undone       [][2]int64 `json:"undone,omitempty"`
	UndoneMore   int        `json:"undone_more,omitempty"`
	Overflows    int64      `json:"early_flushes"`
	WriteThrough int64      `json:"written_through"`
}

// CheckResult is cache.Check's verdict on the devices after the cut.
type CheckResult struct {
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

// RecoveryResult is what the reopened cache reports.
type RecoveryResult struct {
	Mode            string `json:"mode"`
	ReplayedRecords int64  `json:"replayed_records"`
	ReplayDropped   int64  `json:"dropped_records"`
	Extents         int64  `json:"extents"`
	DirtyBytes      int64  `json:"dirty_bytes"`
}

// PowerCutResult is the answer to POST /v1/fault/power-cut.
type PowerCutResult struct {
	Cut         int             `json:"cut"` // 1 for the server's first cut
	Model       string          `json:"model"`
	Seed        uint64          `json:"seed"`
	Connections int             `json:"connections_dropped"`
	Devices     []DeviceLoss    `json:"devices"`
	Check       *CheckResult    `json:"check,omitempty"`
	Recovery    *RecoveryResult `json:"recovery,omitempty"`
	Error       string          `json:"error,omitempty"`       // the cut or the power-on failed
	PoweredOff  bool            `json:"powered_off,omitempty"` // power-cut --off: no Check or Recovery yet
	Millis      float64         `json:"millis"`
}

// ErrPowerOff and ErrPowerOn refuse a cut while the power is off and a
// power-on while it is on.
var (
	ErrPowerOff = fmt.Errorf("%w: the power is off: `nbdcache ctl power-on` first", control.ErrBadRequest)
	ErrPowerOn  = fmt.Errorf("%w: the power is on", control.ErrBadRequest)
)

// powerCut cuts the power under model and, unless stayOff, powers the
// devices on again. With stayOff every request fails with EIO, as on a
// disk without power, until powerOn.
func (r *Rig) PowerCut(model storage.LossModel, seed uint64, stayOff bool) (PowerCutResult, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mu.off {
		return PowerCutResult{}, ErrPowerOff
	}
	start := time.Now()
	r.mu.cuts++
	res := PowerCutResult{Cut: r.mu.cuts, Model: LossModelName(model), Seed: seed}

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
		d := DeviceLoss{
			Device: chains[i].name, Entries: rep.Entries, Dropped: rep.Dropped, Kept: rep.Kept, Partial: rep.Partial,
			BytesDropped: rep.BytesDropped, BytesKept: rep.BytesKept,
			Overflows: rep.Overflows, WriteThrough: rep.WriteThrough,
		}
		if rep.Torn {
			d.Torn = []int64{rep.TornOff}
		}
		if rep.Garbage {
			d.Garbage = []int64{rep.GarbageOff}
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
func (r *Rig) PowerOn() (PowerCutResult, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.mu.off {
		return PowerCutResult{}, ErrPowerOn
	}
	start := time.Now()
	res := PowerCutResult{Cut: r.mu.cuts}
	r.export.Hold()
	r.mu.off = false
	r.powerOnLocked(&res, nil)
	res.Millis = float64(time.Since(start).Microseconds()) / 1000
	r.log.Info("fault mode: power on", "cut", res.Cut, "millis", res.Millis, "error", res.Error)
	return res, nil
}

// chains are the real devices a power cut hits: the cache's (if any),
// then the backing's, unless it is remote.
func (r *Rig) chains() []*faultChain {
	var cs []*faultChain
	for _, c := range []*faultChain{r.cache, r.back} {
		if c != nil && !c.remote {
			cs = append(cs, c)
		}
	}
	return cs
}

// powerOnLocked is steps 5 and 6 of a cut: fresh Volatile wrappers and
// Gate, cache.Check and cache.Open, and the export switched to the new
// state (held until then). old, if not nil, is the cache that served
// before, closed in the background once its requests are gone.
func (r *Rig) powerOnLocked(res *PowerCutResult, old *cache.Cache) {
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
		res.Check = &CheckResult{
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
			res.Recovery = &RecoveryResult{Mode: s.Mode.String(), ReplayedRecords: s.ReplayedRecords,
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
func (r *Rig) abandon(c *cache.Cache, drained func()) {
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

// Spec is one installed fault, as ctl shows it.
type Spec struct {
	Ops         string  `json:"ops"`
	Errno       string  `json:"errno"`
	Offset      int64   `json:"offset"`
	Length      int64   `json:"length"` // 0: the whole device
	Probability float64 `json:"probability,omitempty"`
	After       int64   `json:"after,omitempty"`
	Times       int64   `json:"times,omitempty"`
	fault       storage.Fault
}

// WireErrnos are the errors an NBD reply can carry; injecting any other
// would reach the client as one of these, not as asked.
type NamedErrno struct {
	Name  string
	Errno unix.Errno
}

func WireErrnos() []NamedErrno {
	return []NamedErrno{
		{"EIO", unix.EIO}, {"EPERM", unix.EPERM}, {"ENOSPC", unix.ENOSPC}, {"EINVAL", unix.EINVAL},
		{"ENOMEM", unix.ENOMEM}, {"EOVERFLOW", unix.EOVERFLOW}, {"ENOTSUP", unix.ENOTSUP}, {"ESHUTDOWN", unix.ESHUTDOWN},
	}
}

func ParseErrno(s string) (unix.Errno, error) {
	if s == "" {
		return unix.EIO, nil
	}
	u := strings.ToUpper(s)
	if u == "EOPNOTSUPP" {
		u = "ENOTSUP"
	}
	var names []string
	for _, e := range WireErrnos() {
		if u == e.Name {
			return e.Errno, nil
		}
		names = append(names, e.Name)
	}
	return 0, fmt.Errorf("%w: errno %q: NBD carries only %s", control.ErrBadRequest, s, strings.Join(names, ", "))
}

func ErrnoName(e error) string {
	for _, w := range WireErrnos() {
		if errors.Is(e, w.Errno) {
			return w.Name
		}
	}
	return fmt.Sprint(e)
}

type NamedOp struct {
	Name string
	Kind storage.OpKind
}

// OpNames are the kinds `--op` takes; "all" comes last.
func OpNames() []NamedOp {
	return []NamedOp{
		{"read", storage.OpRead}, {"write", storage.OpWrite}, {"flush", storage.OpFlush},
		{"trim", storage.OpTrim}, {"zero", storage.OpZero}, {"extents", storage.OpExtents}, {"all", storage.OpAll},
	}
}

// ParseOps reads "read,write" (empty: every kind).
func ParseOps(s string) (storage.OpKind, error) {
	if s == "" {
		return storage.OpAll, nil
	}
	var k storage.OpKind
	for _, part := range strings.Split(s, ",") {
		found := false
		for _, o := range OpNames() {
			if strings.TrimSpace(part) == o.Name {
				k |= o.Kind
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
func (r *Rig) targets(name string, export bool) ([]string, error) {
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
func (r *Rig) knobsOf(target string) *knobs {
	switch target {
	case "export":
		return &r.exportKnobs
	case "cache":
		return &r.cache.knobs
	}
	return &r.back.knobs
}

// Status is the answer to GET /v1/fault and to the error and delay
// endpoints.
type Status struct {
	Cuts    int               `json:"power_cuts"`
	Off     bool              `json:"powered_off"`
	Faults  map[string][]Spec `json:"faults"`
	Failed  map[string]int64  `json:"injected"`         // requests failed so far, per target
	Delays  map[string]string `json:"delays,omitempty"` // "read=5ms,write=5ms", per target
	Pending map[string]int64  `json:"unsynced_bytes"`   // what a cut may drop now, per device
}

func (r *Rig) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := Status{Cuts: r.mu.cuts, Off: r.mu.off, Faults: map[string][]Spec{}, Failed: map[string]int64{},
		Delays: map[string]string{}, Pending: map[string]int64{}}
	ts, _ := r.targets("", true)
	for _, t := range ts {
		if fs := r.mu.faults[t]; len(fs) > 0 {
			st.Faults[t] = fs
		}
		st.Failed[t] = r.knobsOf(t).faulty.Injected()
		var parts []string
		for _, o := range OpNames()[:6] {
			if l := r.knobsOf(t).delay.Latency(o.Kind); l > 0 {
				parts = append(parts, o.Name+"="+l.String())
			}
		}
		if len(parts) > 0 {
			st.Delays[t] = strings.Join(parts, ",")
		}
	}
	for _, c := range r.chains() {
		st.Pending[c.name] = c.vol.Stats().UnsyncedBytes
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
func (r *Rig) knobRequest(q url.Values) (ts []string, clear bool, ops storage.OpKind, err error) {
	if ts, err = r.targets(q.Get("target"), true); err != nil {
		return nil, false, 0, err
	}
	if q.Get("clear") != "" {
		return ts, true, 0, nil
	}
	if len(ts) != 1 {
		return nil, false, 0, fmt.Errorf("%w: --target export, cache or backing is required", control.ErrBadRequest)
	}
	ops, err = ParseOps(q.Get("op"))
	return ts, false, ops, err
}

// setError installs (or, with clear, removes) an injected error.
func (r *Rig) SetError(q url.Values) error {
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
	errno, err := ParseErrno(q.Get("errno"))
	if err != nil {
		return err
	}
	var spec Spec
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
	spec.Ops, spec.Errno = ops.String(), ErrnoName(errno)
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
func (r *Rig) SetDelay(q url.Values) error {
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

// Register adds the fault API to the control handler; r is
// nil without --faults, and the endpoints then say so.
//
//	GET  /v1/fault                          Status
//	POST /v1/fault/power-cut?model=&seed=&off=   PowerCutResult (off=1: the power stays off)
//	POST /v1/fault/power-on                      PowerCutResult (after off=1)
//	POST /v1/fault/error?target=&op=&errno=&offset=&length=&probability=&after=&times=  (or clear=1)
//	POST /v1/fault/delay?target=&op=&latency=                                           (or clear=1)
func Register(h http.Handler, r *Rig) {
	control.Register(h, "GET /v1/fault", func(w http.ResponseWriter, req *http.Request) {
		if r == nil {
			control.WriteError(w, ErrOff)
			return
		}
		control.WriteJSON(w, r.Status())
	})
	control.Register(h, "POST /v1/fault/power-cut", func(w http.ResponseWriter, req *http.Request) {
		if r == nil {
			control.WriteError(w, ErrOff)
			return
		}
		q := req.URL.Query()
		model := storage.LoseUnsynced
		if m := q.Get("model"); m != "" {
			var err error
			if model, err = ParseLossModel(m); err != nil {
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
		res, err := r.PowerCut(model, seed, q.Get("off") != "")
		if err != nil {
			control.WriteError(w, err)
			return
		}
		control.WriteJSON(w, res)
	})
	control.Register(h, "POST /v1/fault/power-on", func(w http.ResponseWriter, req *http.Request) {
		if r == nil {
			control.WriteError(w, ErrOff)
			return
		}
		res, err := r.PowerOn()
		if err != nil {
			control.WriteError(w, err)
			return
		}
		control.WriteJSON(w, res)
	})
	// setter answers a request that changes the injected faults with the
	// fault state that results.
	setter := func(set func(*Rig, url.Values) error) http.HandlerFunc {
		return func(w http.ResponseWriter, req *http.Request) {
			if r == nil {
				control.WriteError(w, ErrOff)
				return
			}
			if err := set(r, req.URL.Query()); err != nil {
				control.WriteError(w, err)
				return
			}
			control.WriteJSON(w, r.Status())
		}
	}
	control.Register(h, "POST /v1/fault/error", setter((*Rig).SetError))
	control.Register(h, "POST /v1/fault/delay", setter((*Rig).SetDelay))
}
