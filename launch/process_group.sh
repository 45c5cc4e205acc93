#!/usr/bin/env bash
# Sourced by the launch wrappers: run_group CMD... runs CMD in a process group of its own and forwards
# SIGINT / SIGTERM (Ctrl-C, a scheduler's kill) to the whole group, so no rank is left training when the
# launcher stops; DeepSpeed's runner forwards signals to its ranks only for multi-node launches. When
# CMD exits, whatever is left of its group is terminated too. Returns CMD's exit status.

run_group() {
    setsid "$@" &
    local child=$! rc=0
    # Non-interactive bash starts background jobs in its own group, so setsid runs in place: pid = group id.
    trap 'kill -INT -- "-$child" 2>/dev/null' INT
    trap 'kill -TERM -- "-$child" 2>/dev/null' TERM
    while true; do
        wait "$child" && rc=0 || rc=$?
        kill -0 "$child" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
    done
    trap - INT TERM
    kill -TERM -- "-$child" 2>/dev/null || true  # stragglers of the group
    return "$rc"
}
