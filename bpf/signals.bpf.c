/* signals: fatal signals generated, counted in the kernel by signal number
 * (agent/sources/ebpf/signals.py).
 *
 *   signal:signal_generate   counted when the kernel queued the signal (result 0,
 *                            TRACE_SIGNAL_DELIVERED) and the signal is in HA_FATAL_SIGNALS
 *
 * Signals the target ignores (result 1), that were already pending (2) or could not be queued
 * (3, 4) are not counted. HA_FATAL_SIGNALS is a bit mask (bit n = signal n) built by the agent
 * from its documented list (a parameter: -D under bcc, a .rodata global under CO-RE); the
 * tracepoint does not say whether the target installed a handler, which is why the list is fixed
 * rather than decided per event. Tracepoint arguments only.
 */
#include "hostagent.h"

#ifdef HA_CORE
const volatile u64 HA_FATAL_SIGNALS = 1ULL << 9;  /* SIGKILL */
#elif !defined(HA_FATAL_SIGNALS)
#define HA_FATAL_SIGNALS (1ULL << 9)
#endif

#define HA_NSIG 64                             /* signals 1..63 fit the mask */
#define HA_TRACE_SIGNAL_DELIVERED 0

HA_PERCPU_ARRAY(fatal_signals, u64, HA_NSIG);  /* index: signal number */

#ifndef HA_CORE
HA_MAP_FN u64 *fatal_signals_lookup(u32 *sig) { return fatal_signals.lookup(sig); }
#endif

HA_TRACEPOINT(signal, signal_generate, signal_generate)
{
    int sig = args->sig;
    if (args->result != HA_TRACE_SIGNAL_DELIVERED || sig <= 0 || sig >= HA_NSIG)
        return 0;
    if (!((HA_FATAL_SIGNALS >> sig) & 1))
        return 0;
    u32 key = sig;
    u64 *count = HA_LOOKUP(fatal_signals, &key);
    if (count)
        *count += 1;
    return 0;
}
