//go:build race

package cache

// raceEnabled: the race detector is on (replay commands say -race).
const raceEnabled = true
