#!/usr/bin/env bash
# Prints a table of every test that a `cargo test` run reported as ignored, and why, from the
# run's output (stdout and stderr together). Tests that need a component the machine lacks end
# as "ignored (reason)" through strata_testkit's harness (under CI=1 a missing component fails
# the test instead; only host facts CI may have, like a PVM host, stay ignored), and libtest's
# own `#[ignore = "reason"]` prints "ignored, reason".
# Usage: scripts/ci-skips.sh LOG
set -euo pipefail
log=${1:?usage: ci-skips.sh LOG}
awk '
  /^ *Running / { bin = $2; sub(/^.*\//, "", bin); sub(/\.rs$/, "", bin); next }
  /^ *Doc-tests / { bin = "doctests " $2; next }
  /^test .* \.\.\. ignored/ {
    line = $0
    sub(/^test /, "", line)
    name = line; sub(/ +\.\.\. ignored.*$/, "", name)
    why = line; sub(/^.* \.\.\. ignored/, "", why)
    sub(/^(, | \()/, "", why); if (line ~ /\.\.\. ignored \(/) sub(/\)$/, "", why)
    if (why == "") why = "#[ignore] (no reason given)"
    rows[++n] = sprintf("| %s | %s | %s |", bin, name, why)
  }
  END {
    print ""
    print "Skipped tests (" n + 0 "):"
    if (n == 0) { print "  none"; exit }
    print "| test binary | test | why |"
    print "| --- | --- | --- |"
    for (i = 1; i <= n; i++) print rows[i]
  }
' "$log"
