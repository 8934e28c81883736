#!/usr/bin/env bash
# Peers side by side: the same boot-sector workloads on duet's interpreter, QEMU TCG and Bochs,
# on this host in one run; prints instructions per second for each and the ratios.
#
#   bash benches/peers.sh [runs]        (default: 3 runs of each figure; the best is used)
#
# Method (docs/BENCHMARKS.md says more):
# - `duet-peer-workload image W` writes a floppy whose boot sector runs workload W (alu, sieve,
#   or empty) in real mode, then exits through port 0xF4 (QEMU isa-debug-exit, duet's debug
#   exit) or port 0x8900 "Shutdown" (Bochs). The work depends on nothing the BIOS leaves.
# - The instruction count N is what duet's interpreter retires from 0x7C00 to the exit; the
#   code is deterministic, so every CPU retires the same N (Bochs's own instruction counter
#   agrees). Each peer runs the workload at its own scale (loop iterations), so that a fast
#   peer runs for seconds; N is linear in the scale and `duet-peer-workload count` gives it.
# - duet: the run is timed inside the process (machine already built; startup is <1 ms).
#   QEMU and Bochs: the whole process is timed and the best time of the `empty` workload (BIOS
#   boot, process start and exit) is subtracted.
# Nothing is installed here: missing peers are reported with the command that installs them.
set -euo pipefail

runs=${1:-3}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

command -v bc >/dev/null || { echo "bc missing (install: apt-get install bc)"; exit 1; }
qemu=$(command -v qemu-system-x86_64 || true)
bochs=$(command -v bochs || true)
bochs_bios=/usr/share/bochs/BIOS-bochs-latest
bochs_vga=/usr/share/bochs/VGABIOS-lgpl-latest
[ -n "$qemu" ] || echo "QEMU missing: skipped (install: apt-get install qemu-system-x86)"
if [ -z "$bochs" ] || [ ! -f "$bochs_bios" ] || [ ! -e "$bochs_vga" ]; then
    echo "Bochs missing: skipped (install: apt-get install bochs bochsbios vgabios)"
    bochs=
fi
# Scales (alu: millions of loop iterations; sieve: sieve runs), chosen so each run takes seconds.
declare -A duet_scale=([alu]=20 [sieve]=100) bochs_scale=([alu]=40 [sieve]=200) qemu_scale=([alu]=2000 [sieve]=4000)

echo "building duet-peer-workload (release)…"
cargo build --quiet --release --manifest-path "$root/Cargo.toml" -p duet-benches --bin duet-peer-workload
tool="$root/target/release/duet-peer-workload"

now() { date +%s.%N; }
# best (smallest) of the numbers on stdin
best() { sort -g | head -1; }

# run_qemu IMG: runs the image to its debug exit; expects exit status 1 (debug exit 0 = pass).
run_qemu() {
    local status=0
    "$qemu" -accel tcg -machine pc -m 32 -display none -monitor none -serial none -parallel none \
        -no-reboot -drive "file=$1,format=raw,if=floppy" -boot a \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 -debugcon "file:$work/qemu.log" || status=$?
    [ "$status" -eq 1 ] || { echo "QEMU: $1 ended with status $status, not 1 (pass)" >&2; return 1; }
    grep -q P "$work/qemu.log" || { echo "QEMU: $1 did not report P" >&2; return 1; }
}

run_bochs() {
    cat >"$work/bochsrc" <<EOF
megs: 32
romimage: file=$bochs_bios
vgaromimage: file=$bochs_vga
floppya: 1_44=$1, status=inserted
boot: floppy
display_library: rfb, options="timeout=0"
sound: driver=dummy
speaker: enabled=0
clock: sync=none
port_e9_hack: enabled=1
log: $work/bochs.log
panic: action=fatal
error: action=report
info: action=ignore
debug: action=ignore
EOF
    # Debian's Bochs is built with its debugger, which stops before the first instruction: `c`.
    echo c | bochs -q -f "$work/bochsrc" >"$work/bochs.out" 2>&1 || true
    grep -q "Shutdown port: shutdown requested" "$work/bochs.out" || {
        echo "Bochs: $1 did not shut down through port 0x8900:" >&2; tail -5 "$work/bochs.out" >&2; return 1; }
    grep -q "^P" "$work/bochs.out" "$work/bochs.log" || { echo "Bochs: $1 did not report P" >&2; return 1; }
}

# time_it CMD...: prints the best wall time of $runs runs
time_it() {
    for _ in $(seq "$runs"); do
        local t0 t1
        t0=$(now); "$@"; t1=$(now)
        echo "$t1 - $t0" | bc -l
    done | best
}

"$tool" image empty "$work/empty.img"
for w in alu sieve; do
    "$tool" image "$w" "$work/$w-qemu.img" "${qemu_scale[$w]}"
    "$tool" image "$w" "$work/$w-bochs.img" "${bochs_scale[$w]}"
done

echo
echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
[ -n "$qemu" ] && echo "qemu: $("$qemu" --version | head -1)"
[ -n "$bochs" ] && echo "bochs: $(dpkg-query -W -f='${Version}' bochs 2>/dev/null || echo unknown)"
if [ -n "$qemu" ]; then q_empty=$(time_it run_qemu "$work/empty.img"); echo "qemu empty run (BIOS boot + process): ${q_empty}s"; fi
if [ -n "$bochs" ]; then b_empty=$(time_it run_bochs "$work/empty.img"); echo "bochs empty run (BIOS boot + process): ${b_empty}s"; fi

echo
fmt() { if [ "$1" = - ]; then echo -; else printf '%.3g' "$1"; fi; }
rows=()
for w in alu sieve; do
    n= d_best=
    for _ in $(seq "$runs"); do
        out=$("$tool" interp "$w" "${duet_scale[$w]}")
        read -r _ n _ secs <<<"$out"
        d_best=$(printf '%s\n%s\n' "${d_best:-$secs}" "$secs" | best)
    done
    d_mips=$(echo "$n / $d_best / 1000000" | bc -l)
    echo "$w: duet interp ${n} instructions, best ${d_best}s"
    q_mips=- b_mips=- dq=- db=-
    if [ -n "$qemu" ]; then
        qn=$("$tool" count "$w" "${qemu_scale[$w]}")
        q=$(time_it run_qemu "$work/$w-qemu.img")
        q_mips=$(echo "$qn / ($q - $q_empty) / 1000000" | bc -l)
        dq=$(echo "$d_mips / $q_mips" | bc -l)
        echo "$w: qemu ${qn} instructions, best ${q}s - ${q_empty}s"
    fi
    if [ -n "$bochs" ]; then
        bn=$("$tool" count "$w" "${bochs_scale[$w]}")
        b=$(time_it run_bochs "$work/$w-bochs.img")
        b_mips=$(echo "$bn / ($b - $b_empty) / 1000000" | bc -l)
        db=$(echo "$d_mips / $b_mips" | bc -l)
        echo "$w: bochs ${bn} instructions, best ${b}s - ${b_empty}s"
    fi
    rows+=("$(printf '%-8s %10s %10s %10s %10s %11s' "$w" "$(fmt "$d_mips")" "$(fmt "$q_mips")" \
        "$(fmt "$b_mips")" "$(fmt "$dq")" "$(fmt "$db")")")
done
echo
printf '%-8s %10s %10s %10s %10s %11s\n' workload duet-MIPS qemu-MIPS bochs-MIPS duet/qemu duet/bochs
printf '%s\n' "${rows[@]}"
