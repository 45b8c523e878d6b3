package cache

import (
	"sync"
	"testing"
)

// TestCommitTurnOutlivesPublish (from the review of the turn's move into
// journal methods): a commit's turn is written, a
// publisher takes the next turn during the commit's sync (with more
// records, enough to seal a block), writes them, and only then does the
// commit's sync end. The journal must then claim durable exactly what the
// commit wrote before its sync: not the publisher's blocks or records.
func TestCommitTurnOutlivesPublish(t *testing.T) {
	var mu sync.Mutex
	var j journal
	j.init(&mu, 1, 0, 0)
	const slots = 64
	add := func(n int) {
		for range n {
			if j.add(record{Type: recInsert, Dirty: true, Off: 0, Len: 8, Loc: 0, Ver: 1}) {
				j.seal(1, slots, 1)
			}
		}
	}
	add(5)
	j.seal(1, slots, 1) // commit seals first
	g := j.goal()
	if !j.turnFree(true) {
		t.Fatal("turn not free")
	}
	ct := j.take(jCommit, 1)
	j.written(&ct, nil)
	wantDurable, wantSynced := g.seq, g.appended
	if ct.durable != wantDurable || ct.visible != wantSynced {
		t.Fatalf("commit turn %d/%d, want %d/%d", ct.durable, ct.visible, wantDurable, wantSynced)
	}
	// During the sync: a publisher appends more than a block's worth and
	// takes the turn.
	add(jRecsPerBlk + 7)
	if !j.turnFree(false) {
		t.Fatal("a publish may not run during a commit's sync")
	}
	pt := j.take(jPublish, 1)
	pt.finishOpen(1)
	j.written(&pt, nil)
	if !j.syncing {
		t.Fatal("the publisher's turn ended the commit's sync")
	}
	if !j.syncDone(&ct, nil) {
		t.Fatal("sync failed")
	}
	if j.durable != wantDurable || j.synced != wantSynced {
		t.Fatalf("after the commit's sync: durable %d synced %d, want %d %d (the publisher's turn leaked in: %d %d)",
			j.durable, j.synced, wantDurable, wantSynced, pt.durable, pt.visible)
	}
	if j.visible != pt.visible || j.writing || j.syncing {
		t.Fatalf("visible %d (want %d) writing %v syncing %v", j.visible, pt.visible, j.writing, j.syncing)
	}
}
