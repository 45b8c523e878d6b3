#!/bin/bash
# fio power-cut rounds against a running `nbdcache serve --faults`.
#
#   fio-powercut.sh --uri URI --control unix:PATH [--rounds N] [--size SIZE]
#                   [--model unflushed|random|torn|cycle] [--seed N]
#                   [--nbdcache BIN] [--dir DIR] [--min-ms N] [--max-ms N]
#
# Each round:
#   1. fio writes (randwrite, 4k, iodepth 16, verify=crc32c) with
#      verify_state_save; after a random delay (--min-ms..--max-ms) the
#      script touches fio's trigger file: fio saves its verify state and
#      stops; as soon as it has exited, `nbdcache ctl power-cut` cuts the
#      power (the cache's writeback, journal and checkpoints are still
#      running then);
#   2. the power-cut report must show a clean check and a successful
#      power-on (the cache's recovery, as at a real start);
#   3. fio runs the same job with verify_only=1 verify_state_load=1
#      verify_fatal=1: every write fio saw complete must read back.
#
# Why not cut from fio's --trigger command, while fio still has writes in
# flight? fio (3.33) runs that command without waiting for its job to stop;
# the writes in flight then fail (the connection drops), and the verify
# state fio saves when the job exits counts a failed write as done, so the
# verify phase reports it lost though it was never acknowledged. Cuts in
# the middle of client I/O are tested with a client that tracks its
# acknowledgements exactly (test/powercut_test.go, aiowriter.py).
# It prints "round I: PASS" or "round I: FAIL (why)" and, at the end,
# "passed P of N"; it exits 0 only when every round passed.
#
# fio verifies every write it saw complete, so the server must acknowledge a
# write only once it is durable: `serve --sync always` (or a client that
# sends FUA). Against a server without it, rounds are expected to fail:
# that is the negative control.
set -u

uri= ctl= rounds=5 size=192M model=cycle seed=$$ bin=nbdcache dir= minms=300 maxms=1000
while [ $# -gt 0 ]; do
	case $1 in
	--uri) uri=$2; shift ;;
	--control) ctl=$2; shift ;;
	--rounds) rounds=$2; shift ;;
	--size) size=$2; shift ;;
	--model) model=$2; shift ;;
	--seed) seed=$2; shift ;;
	--nbdcache) bin=$2; shift ;;
	--dir) dir=$2; shift ;;
	--min-ms) minms=$2; shift ;;
	--max-ms) maxms=$2; shift ;;
	-h|--help) sed -n '2,25p' "$0"; exit 0 ;;
	*) echo "unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
[ -n "$uri" ] && [ -n "$ctl" ] || { echo "usage: $0 --uri URI --control unix:PATH [...]" >&2; exit 2; }
command -v fio >/dev/null || { echo "fio is not installed" >&2; exit 2; }
[ -n "$dir" ] || dir=$(mktemp -d)
mkdir -p "$dir"
RANDOM=$seed
echo "seed $seed (replay with --seed $seed); work files in $dir"

models=(unflushed random torn)
passed=0
for round in $(seq 1 "$rounds"); do
	m=$model
	[ "$m" = cycle ] && m=${models[$(((round - 1) % 3))]}
	aux=$dir/round-$round
	rm -rf "$aux"
	mkdir -p "$aux"
	cutseed=$((RANDOM * 32768 + RANDOM))
	fioseed=$((RANDOM * 32768 + RANDOM))
	delay=$((minms + RANDOM % (maxms - minms + 1)))
	job=(--name=powercut --ioengine=nbd "--uri=$uri" --rw=randwrite --bs=4k "--size=$size"
		--iodepth=16 "--randseed=$fioseed" --verify=crc32c "--aux-path=$aux")

	# 1. write until the trigger, then cut the power.
	(sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"; touch "$aux/trigger") &
	sleeper=$!
	fio "${job[@]}" --do_verify=0 --verify_state_save=1 "--trigger-file=$aux/trigger" \
		"--trigger=touch $aux/triggered" "--output=$aux/write.txt" >"$aux/write.err" 2>&1
	fioexit=$?
	wait "$sleeper" 2>/dev/null
	why=
	if [ ! -f "$aux/triggered" ]; then
		why="fio finished before the trigger (make --size larger or --max-ms smaller)"
	elif [ $fioexit != 0 ]; then
		why="fio failed while writing: $(grep -m1 -h 'err=\|error' "$aux/write.err" "$aux/write.txt")"
	else
		$bin ctl --control "$ctl" power-cut --model "$m" --seed "$cutseed" >"$aux/cut.txt" 2>&1
		echo "exit=$?" >>"$aux/cut.txt"
	fi
	if [ -n "$why" ]; then
		:
	elif ! grep -q '^exit=0$' "$aux/cut.txt"; then
		why="power-cut failed: $(tr '\n' ' ' <"$aux/cut.txt")"
	elif ! ls "$aux"/*verify.state >/dev/null 2>&1; then
		why="fio saved no verify state"
	fi
	# 2. the check and the recovery report.
	if [ -z "$why" ] && ! grep -q 'check: *clean' "$aux/cut.txt"; then
		why="check after the cut: $(grep 'check:' "$aux/cut.txt")"
	fi
	# 3. verify.
	if [ -z "$why" ]; then
		if ! fio "${job[@]}" --verify_only=1 --verify_state_load=1 --verify_fatal=1 \
			"--output=$aux/verify.txt" >"$aux/verify.err" 2>&1; then
			why="verify failed: $(grep -m1 -h 'verify:' "$aux/verify.err" "$aux/verify.txt")"
		fi
	fi
	written=$(grep -o 'io=[0-9.]*[KMG]*i*B' "$aux/write.txt" 2>/dev/null | head -1)
	if [ -z "$why" ]; then
		passed=$((passed + 1))
		echo "round $round: PASS (model $m, cut after ${delay}ms, fio wrote ${written#io=}, cut seed $cutseed)"
	else
		echo "round $round: FAIL (model $m, cut after ${delay}ms, cut seed $cutseed): $why"
	fi
done
echo "passed $passed of $rounds"
[ "$passed" = "$rounds" ]
