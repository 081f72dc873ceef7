"""Transport speed-ups as options of one host: a Noise transport with batched sessions, a tuned yamux.

No process-wide state: `host_options(key_pair, cfg)` gives what `new_host` takes; a stock host in
the same process is untouched. cipher (ChaChaPoly cipher state), noise (batched Noise sessions),
yamux (tuned muxer and stream), io (gathered writes, buffer-taking reads), locks (quick locks),
heap (opt-in glibc thresholds), options (TransportConfig -> new_host options).
"""
