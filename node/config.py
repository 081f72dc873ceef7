"""Typed configuration of the node subsystems (every timeout and limit is a named field)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a policy is built, not with the config
    from sharding.device import ExecutionPolicy

from protocol.modelspec import (
    MAX_POWER_ITERATIONS,
    POWERSGD_BITS,
    REPLICA_AVERAGING,
    REPLICA_EXCHANGE,
    check_schedule,
)


@dataclass
class TransportConfig:
    """The libp2p host and the `/pmn/act/1.0.0` activation protocol."""

    max_frame_bytes: int = 64 * 1024 * 1024  # hard limit on header + body of one frame, checked from the header
    credits: int = 4  # microbatches a receiver lets a sender have in flight (granted at the handshake)
    yamux_frame_bytes: int = 256 * 1024  # payload bytes per yamux DATA frame this process sends (py default 64 KiB)
    stream_window_bytes: int = 16 * 1024 * 1024  # yamux receive window granted on act streams (py default 256 KiB)
    tcp_read_bytes: int = 1 << 20  # read-ahead of each TCP connection (0 = py-libp2p's stock Noise + yamux)
    yamux_window_wait_s: float = 5.0  # a yamux writer out of send window gives up after this long (py-libp2p: 5 s)
    write_stall_s: float = 30.0  # a sealed Noise write is never cut by a caller's timeout (half a message would
    # desynchronise the connection's cipher); one that cannot reach the socket in this long closes its connection
    tune_heap: bool = True  # make_host sets glibc's heap thresholds for megabyte buffers (process-wide; tuned hosts only)
    handshake_timeout_s: float = 10.0  # time allowed for the HELLO exchange on a new stream
    ack_timeout_s: float = 60.0  # time allowed for all frames of a step to be acknowledged
    reject_penalty: float = 1.0  # score subtracted from a peer for each rejected frame
    ban_score: float = -5.0  # a peer whose score falls to this value or below is refused
    dial_timeout_s: float = 10.0  # time allowed for one connect + stream open to a neighbour
    dial_retries: int = 1  # more attempts libp2p makes after a failed dial (its RetryConfig.max_retries; py-libp2p's
    # default 3 makes every dial to a dead peer, e.g. a killed replica still announced, cost 0.7 s of backoff)
    dial_retry_delay_s: float = 0.1  # wait before the first of those attempts (doubled for each next one)
    error_linger_s: float = 2.0  # after sending ERROR, how long to wait for the peer to close before a reset
    hash_thread_bytes: int = 8 * 1024 * 1024  # bodies this large are hashed in a worker thread, smaller ones on the loop (0 = never)
    max_pending_norms: int = 64  # gradient-norm frames a channel holds unclaimed; one more fails the channel (a flood)

    def hashes_in_thread(self, body_bytes: int) -> bool:
        """Whether a frame body of this size is hashed in a worker thread rather than on the event loop."""
        return 0 < self.hash_thread_bytes <= body_bytes

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.max_frame_bytes < 1024:
            raise ValueError(f"transport.max_frame_bytes must be >= 1024, got {self.max_frame_bytes}")
        if self.max_pending_norms < 2:
            raise ValueError(f"transport.max_pending_norms must be >= 2, got {self.max_pending_norms}")
        if self.credits < 1:
            raise ValueError(f"transport.credits must be >= 1, got {self.credits}")
        if self.hash_thread_bytes < 0:
            raise ValueError(f"transport.hash_thread_bytes must be >= 0, got {self.hash_thread_bytes}")
        if not 1024 <= self.yamux_frame_bytes <= 16 * 1024 * 1024:
            raise ValueError("transport.yamux_frame_bytes must be within [1 KiB, 16 MiB]")
        if self.tcp_read_bytes < 0:
            raise ValueError(f"transport.tcp_read_bytes must be >= 0, got {self.tcp_read_bytes}")
        for name in ("handshake_timeout_s", "ack_timeout_s", "dial_timeout_s", "yamux_window_wait_s", "write_stall_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"transport.{name} must be > 0")
        if self.dial_retries < 0 or self.dial_retry_delay_s < 0:
            raise ValueError(f"transport.dial_retries and transport.dial_retry_delay_s must be >= 0, got "
                             f"{self.dial_retries} and {self.dial_retry_delay_s}")


@dataclass
class DhtConfig:
    """Kademlia DHT (libp2p `/ipfs/kad/1.0.0`, server mode) used to find peers of the same model."""

    enabled: bool = True  # run the DHT; False = bootstrap peers + announcement gossip only
    provide_interval_s: float = 30.0  # how often the node re-advertises itself as a provider of its model's keys
    lookup_interval_s: float = 2.0  # how often the node looks up the providers of its model's key
    query_timeout_s: float = 15.0  # time allowed for one provide or provider lookup (then counted as an error)
    max_providers: int = 20  # providers taken from one lookup
    error_backoff_s: float = 1.0  # wait before retrying a failed DHT operation, doubled per failure in a row
    error_backoff_max_s: float = 30.0  # cap on that wait

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        for name in ("provide_interval_s", "lookup_interval_s", "query_timeout_s", "error_backoff_s",
                     "error_backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"discovery.dht.{name} must be > 0, got {getattr(self, name)}")
        if self.max_providers < 1:
            raise ValueError(f"discovery.dht.max_providers must be >= 1, got {self.max_providers}")


@dataclass
class DiscoveryConfig:
    """Bootstrap + announcement gossip over `/pmn/announce/1.0.0` + providers of the model key in the DHT."""

    announce_interval_s: float = 0.5  # how often the node re-pulls peer tables from connected peers
    entry_ttl_s: float = 30.0  # an announcement older than this is dropped from the table
    discovery_timeout_s: float = 60.0  # how long to wait for a peer serving a needed stage
    liveness_intervals: float = 4.0  # a peer counts as alive while its own last announcement is younger than this
    # many announce intervals (rollbacks, missing contributions, the finish grace)
    dht: DhtConfig = field(default_factory=DhtConfig)  # Kademlia DHT settings (dht.enabled=False turns it off)

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        for name in ("announce_interval_s", "entry_ttl_s", "discovery_timeout_s", "liveness_intervals"):
            if getattr(self, name) <= 0:
                raise ValueError(f"discovery.{name} must be > 0, got {getattr(self, name)}")
        self.dht.validate()

    def liveness_s(self) -> float:
        """How recent a peer's own announcement must be for the peer to count as alive."""
        return self.liveness_intervals * self.announce_interval_s


@dataclass
class RuntimeConfig:
    """Pipeline schedule and fault handling."""

    steps: int = 10  # global steps to train (the run ends after this step count; resume continues to it)
    num_microbatches: int = 4  # microbatches per global step (gradient accumulation)
    microbatch_size: int = 4  # sequences per microbatch
    codec: str = "dense"  # boundary codec name (sharding.codecs); must match across the pipeline
    replica_averaging: str = "dense"  # how replicas of a stage exchange gradients: dense fp32, dense-bf16 (half the
    # bytes) or powersgd (rank-r factors with error feedback); part of the spec, must match across the stage's replicas
    powersgd_rank: int = 4  # rank r of PowerSGD contributions (replica_averaging = powersgd)
    powersgd_bits: int = 16  # PowerSGD factors on the wire: 16 (bf16), 8 (int8 codes with a bf16 scale per column;
    # half the bytes, the rounding goes into the error feedback) or 4 (int4 codes, two to a byte: a quarter); part of
    # the spec like replica_averaging
    powersgd_iterations: int = 1  # PowerSGD power iterations per contribution: more fit the rank-r factors closer to
    # the gradient for the same bytes (compute only: each replica encodes its own); part of the spec
    powersgd_block_rank: int = 0  # PowerSGD rank of the transformer blocks' matrices (0: powersgd_rank); part of the
    # spec like powersgd_rank
    replica_exchange: str = "microbatch"  # when a replica's contributions leave: microbatch (each one, held by a
    # second replica before its gradient goes upstream) or step (one per replica and step once the commit is known);
    # part of the spec like replica_averaging
    frame_timeout_s: float = 120.0  # longest wait for the next frame from a neighbour within a step
    step_retries: int = 3  # times a failed step is retried (after re-dialling) before giving up
    redial_timeout_s: float = 30.0  # how long to look for a replacement neighbour before a retry
    retry_backoff_s: float = 0.5  # wait before the first redial attempt, doubled per attempt
    checkpoint_every: int = 1  # save a checkpoint every this many steps (0 = only on shutdown)
    checkpoint_keep: int = 2  # checkpoints a node keeps per stage (older ones are deleted; 0 = all); replicated mode: a
    # rollback rewinds only to a step every stage still holds (or runs at), so keep enough to cover how far stages drift
    abandoned_keep: int = 2  # replicated mode: generations of checkpoints abandoned by a rollback a node keeps per stage
    # (moved aside into checkpoints/stage<s>/abandoned/gen<g>/, never deleted otherwise; older ones are deleted; 0 = all)
    grad_norm_timeout_s: float = 120.0  # longest wait for a neighbour's squared-gradient-norm message (grad clipping)
    torch_threads: int = 0  # torch intra-op threads for this process (0 = leave torch's default)
    schedule: str = "gpipe"  # gpipe (all forwards eagerly), 1f1b (stage s keeps <= num_stages - s microbatches in flight), async
    max_staleness: int = 0  # async: step k's forward and backward use the weights after step k - max_staleness - 1
    async_lookahead: float = 1.0  # async: step k's stashed weights are extrapolated along the last update by this x
    # max_staleness updates (the delay correction, sharding.delayed.WeightStash; 0 = plain weight stashing)
    eval_every: int = 50  # after the update of every this many steps, the pipeline forwards the validation
    # microbatches (forward only, no weight change) and the tail records val_loss; 0 = off. gpipe and 1f1b
    # one-peer-per-stage runs on /pmn/act; async and replicated runs on /pmn/eval (node.pipeline.evaluation:
    # the head records it); neighbours must agree
    eval_batches: int = 4  # validation microbatches (of microbatch_size sequences) per evaluation: a fixed set
    eval_seed: int = 1234  # seed of the validation windows (the corpus's val split, never train)
    eval_timeout_s: float = 60.0  # async and replicated runs (/pmn/eval, node.pipeline.evaluation): bound per stage on
    # an evaluation; stage k allows (num_stages - k) times this for its part (waiting for its weights after the
    # update, its forward) and the rest of the chain
    eval_idle_timeout_s: float = 30.0  # /pmn/eval: a request stream that sends nothing for this long is dropped
    eval_keep: int = 2  # async and replicated runs: copies of the stage weights after evaluated updates a node keeps


@dataclass
class RecipeConfig:
    """The spec's training recipe beyond stages, codec, microbatches and lr (protocol.modelspec.TrainingSection;
    part of the spec hash). `pmn node start` copies it from the spec; these defaults are the run of older specs."""

    warmup_steps: int = 10  # linear warm-up steps
    data_seed: int = 0  # seed of the data order
    schedule: str = "constant"  # LR after the warm-up: constant | cosine | wsd
    total_steps: int | None = None  # optimizer steps of the run; cosine and wsd reach the final LR here
    min_lr_ratio: float = 0.1  # final LR of cosine and wsd, as a fraction of lr
    cooldown_steps: int = 0  # wsd: the last steps, over which the LR falls linearly to the final LR
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 0.0  # clip the global gradient norm to this (stages exchange squared norms); 0 = off
    batch_tokens: int | None = None  # tokens per step; when given, must equal microbatches * microbatch_size * seq_len
    optimizer: str = "adamw"  # adamw | muon (Muon on the blocks' matrices, AdamW on embedding, head and norms)
    muon_momentum: float = 0.95  # muon: Nesterov momentum of the Muon part


@dataclass
class ReplicaConfig:
    """Stage replicas: routing, failover, bans, averaging inside a stage, joining, rebalancing."""

    enabled: bool = False  # replicated mode (several nodes per stage); False = the one-peer-per-stage runtime
    max_inflight: int = 4  # microbatches one downstream replica may hold at once (<= transport.credits): enough to
    # cover a WAN round trip (with 2, three stages at 50 ms took at most 4 microbatches per 0.2 s; benchmarks/wan.py)
    ewma_alpha: float = 0.3  # weight of the newest round-trip latency in a peer's EWMA
    replica_timeout_s: float = 10.0  # round trip allowed for one attempt before it is re-routed and the peer banned
    ban_base_s: float = 1.0  # first ban of a peer; the n-th ban lasts ban_base_s * 2**(n-1)
    ban_max_s: float = 60.0  # cap on one ban's duration
    no_replica_timeout_s: float = 30.0  # how long the next stage may have no usable replica before the step fails
    avg_timeout_s: float = 10.0  # averaging deadline: committed contributions still missing after this are pulled
    # from every stage peer, the state is fetched from a peer that applied the step, or (no live holder left, or
    # none gave them within no_replica_timeout_s) the swarm rolls back: a step is never applied without them
    hold_retry_s: float = 0.2  # a contribution no stage peer took yet is pushed again after this (it is committed
    # only once a second live replica of the stage holds it)
    alone_recheck_s: float = 5.0  # a replica that knows no peer of its stage runs a discovery round (bounded by
    # avg_timeout_s) before it holds a contribution alone, at most this often: a peer that started with it may
    # not have reached its table yet, and a contribution held alone is lost with its holder
    commit_poll_s: float = 1.0  # idle time after which a replica asks its stage peers for the step's commit
    head_takeover_s: float = 3.0  # a standby head replica takes over the step authority once the leading head
    # has refused or failed every dial for this long (or its announcement expired); a slow leader is not replaced
    head_delegation: bool = True  # replica_exchange = "step": the leading head replica hands microbatches to the
    # other head replicas, which compute stage 0 and send the activations themselves (`node.replicas.delegation`);
    # False, or the per-microbatch exchange: the standbys compute nothing
    pipelined_finish: bool = True  # the async window: a step's finish (its COMMIT on, its bundle out, the stage
    # peers' contributions in) starts as soon as its commit is known here, beside the finishes of earlier steps still
    # running, instead of once the step before it is applied (the updates stay in step order). False: one at a time
    max_tasks: int = 16  # delegated head work: microbatches one head replica may hold as the leader's tasks at once
    # (a task stays out for a whole pipeline round trip, so a delegate's even share of a step should fit; the share,
    # ceil(microbatches / head replicas), caps what it gets while the leader can compute the rest itself); the async
    # schedule's window holds runtime.max_staleness + 1 steps, and so max_tasks for each of them
    avg_keep_streams: int = 4  # /pmn/avg streams kept open to each stage peer between requests (a request on a
    # kept stream costs one round trip, a new stream three: node.net.streampool); 0 = a new stream per request
    avg_stream_idle_s: float = 20.0  # a kept /pmn/avg stream unused this long is closed (below the serving
    # side's keep-alive, node.replicas.averaging.AvgLimits.keepalive_s, 30 s)
    catchup_poll_s: float = 0.01  # while behind and catching up, wait this long between pulls of missed steps
    keep_steps: int = 4  # steps of contributions kept in memory for stage peers that pull them (a replica
    # more steps behind than this re-fetches the stage state: keep it above state-transfer time / step time)
    aggregation: str = "mean"  # protocol.aggregation method combining per-microbatch contributions
    state_timeout_s: float = 30.0  # time allowed to fetch a stage's state from a peer when joining
    finish_grace_s: float = 15.0  # after the last step, keep serving this long while a stage peer is still behind
    # (or, when an evaluation follows the last step, while the leading head has not recorded it)
    state_max_concurrent: int = 2  # state transfers one node serves at once; more are refused as busy
    state_burst: int = 8  # state transfers one peer may take back to back (a lagging replica re-syncing)
    state_refill_s: float = 2.0  # beyond the burst, one more transfer per peer per this many seconds
    start_quorum: int = 0  # the leading head's first step waits until this many other nodes (standby head
    # replicas included) are announced serving (0 = one per stage suffices); it starts anyway after
    # discovery.discovery_timeout_s
    rebalance_period_s: float = 0.0  # how often stage throughputs are compared (0 = never rebalance)
    rebalance_threshold: float = 1.5  # move a node when the best stage's throughput exceeds the worst by this factor
    debug_delay_s: float = 0.0  # TEST ONLY: extra seconds of compute per microbatch (simulates a slow GPU)
    debug_push_delay_s: float = 0.0  # TEST ONLY: extra seconds before each contribution push to a stage peer
    # (a slow or loaded link between the replicas of a stage)
    debug_exit_after_forwards: int = 0  # TEST ONLY: SIGKILL this node right after it sent its n-th gradient
    # upstream (0 = never): a crash at the exact point where a committed contribution may be held by it alone;
    # on a leading head, right after its n-th commit made while a standby head replica is announced
    debug_exit_after_commits: int = 0  # TEST ONLY: a leader that sends its COMMIT early (the async window with
    # delegated head work) SIGKILLs itself right after its n-th step COMMIT went on, before its bundle reached the
    # other head replicas (0 = never)

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.max_inflight < 1:
            raise ValueError(f"replicas.max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_tasks < 1:
            raise ValueError(f"replicas.max_tasks must be >= 1, got {self.max_tasks}")
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError(f"replicas.ewma_alpha must be in (0, 1], got {self.ewma_alpha}")
        for name in ("replica_timeout_s", "ban_base_s", "ban_max_s", "no_replica_timeout_s", "avg_timeout_s",
                     "commit_poll_s", "catchup_poll_s", "state_timeout_s", "hold_retry_s", "head_takeover_s",
                     "alone_recheck_s", "avg_stream_idle_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"replicas.{name} must be > 0, got {getattr(self, name)}")
        if self.keep_steps < 1:
            raise ValueError(f"replicas.keep_steps must be >= 1, got {self.keep_steps}")
        if self.avg_keep_streams < 0:
            raise ValueError(f"replicas.avg_keep_streams must be >= 0, got {self.avg_keep_streams}")
        if self.start_quorum < 0:
            raise ValueError(f"replicas.start_quorum must be >= 0, got {self.start_quorum}")
        if self.aggregation not in ("mean", "median", "centered_clip"):
            raise ValueError(f"replicas.aggregation must be mean, median or centered_clip, got {self.aggregation!r}")
        if self.rebalance_period_s < 0 or self.rebalance_threshold <= 1:
            raise ValueError("replicas.rebalance_period_s must be >= 0 and rebalance_threshold > 1")
        if min(self.debug_delay_s, self.debug_push_delay_s, self.debug_exit_after_forwards,
               self.debug_exit_after_commits) < 0:
            raise ValueError("replicas.debug_delay_s, debug_push_delay_s, debug_exit_after_forwards and "
                             "debug_exit_after_commits must be >= 0")
        if self.finish_grace_s < 0:
            raise ValueError(f"replicas.finish_grace_s must be >= 0, got {self.finish_grace_s}")
        if self.state_max_concurrent < 1:
            raise ValueError(f"replicas.state_max_concurrent must be >= 1, got {self.state_max_concurrent}")
        if self.state_burst < 1:
            raise ValueError(f"replicas.state_burst must be >= 1, got {self.state_burst}")
        if self.state_refill_s <= 0:
            raise ValueError(f"replicas.state_refill_s must be > 0, got {self.state_refill_s}")


@dataclass
class ChainConfig:
    """The on-chain model this node is bound to (receipts for every hop, paid inference, audits)."""

    rpc_url: str = ""  # chain JSON-RPC URL; empty = off chain (no receipts, no paid inference)
    deployment: str = ""  # deployment file of the contracts (needed with rpc_url)
    model_id: int = 0  # on-chain model id (>= 1, needed with rpc_url)

    def validate(self) -> None:
        """Raise ValueError naming the missing field."""
        if self.rpc_url and (not self.deployment or self.model_id < 1):
            raise ValueError("--rpc-url needs --deployment FILE and --model-id N (N >= 1)")


@dataclass
class ExecutionConfig:
    """How the stage computes on its device (`device` chooses the device; see sharding.device)."""

    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, or bf16 (autocast, also on CPU)
    adamw: str = "auto"  # AdamW kernel: auto (fused on CUDA, single-tensor on CPU), fused, foreach, single
    compile: bool = False  # torch.compile the stage (off until measured on the target device)
    activation_checkpointing: bool = False  # recompute block activations in backward (less memory, ~1/3 more compute)
    memory_headroom: float = 0.9  # refuse a stage whose estimated bytes exceed this fraction of the free memory

    def validate(self) -> None:
        """Raise ValueError naming the bad field (the device itself is checked when the node starts)."""
        from sharding.device import ExecutionPolicy
        from sharding.errors import DeviceError

        try:
            ExecutionPolicy(precision=self.precision, adamw=self.adamw, compile=self.compile,
                            memory_headroom=self.memory_headroom).validate()
        except DeviceError as exc:
            raise ValueError(f"execution.{exc}") from None

    def policy(self, device: str) -> ExecutionPolicy:
        """The stage's ExecutionPolicy on `device` (auto|cpu|cuda|cuda:N|mps); sharding.DeviceError if absent."""
        from sharding.device import policy_for

        return policy_for(device, precision=self.precision, adamw=self.adamw, compile=self.compile,
                          activation_checkpointing=self.activation_checkpointing,
                          memory_headroom=self.memory_headroom)


@dataclass
class NatConfig:
    """Nodes behind home routers: reachability (AutoNAT v1), circuit relay v2 (serving and reserving), hole
    punching (DCUtR). Relayed connections carry activations only through relays whose limits are ours."""

    enabled: bool = True  # run the NAT service (reachability, relay, hole punching)
    reachability: str = "auto"  # "auto" (AutoNAT dial-backs by peers), or forced "public" / "private"
    autonat_confirmations: int = 1  # agreeing peer verdicts that decide public / private (libp2p's spec: 3)
    autonat_timeout_s: float = 10.0  # time allowed for one peer's dial-back verdict
    autonat_peers: int = 3  # peers asked per reachability check
    autonat_interval_s: float = 60.0  # how often reachability is checked again while running
    reachability_timeout_s: float = 20.0  # longest start-up wait for a verdict before going on as "unknown"
    relay_service: bool = True  # serve circuit relay v2 (hop) while publicly reachable
    relay_max_reservations: int = 32  # reservations this relay holds at once (more are refused)
    relay_max_circuits: int = 16  # concurrent relayed connections per reserving peer
    relay_reservation_ttl_s: int = 3600  # how long a reservation on this relay lasts before it must be renewed
    relay_circuit_duration_s: int = 0  # longest life of one relayed connection (0 = no cap: a step never breaks on it)
    relay_circuit_bytes: int = 1 << 50  # bytes one relayed connection may carry (relay v2's default is 1 GiB)
    max_relays: int = 2  # reservations a private node keeps, on distinct relays
    reservation_timeout_s: float = 10.0  # time allowed for connecting to a relay and reserving a slot
    reservation_renew_fraction: float = 0.5  # renew a reservation once this fraction of its lifetime has passed
    relay_check_interval_s: float = 1.0  # how often a private node checks that its relays are still connected
    relay_retry_backoff_s: float = 1.0  # wait after a failed reservation round, doubled per failure in a row
    relay_retry_backoff_max_s: float = 30.0  # cap on that wait
    relay_start_timeout_s: float = 30.0  # longest start-up wait for a first reservation of a private node
    direct_dial_timeout_s: float = 3.0  # a peer announcing relayed addresses is first dialed directly for this long
    keepalive_interval_s: float = 5.0  # how often every connected peer is pinged (keeps NAT mappings, finds dead links)
    keepalive_timeout_s: float = 10.0  # time allowed for one ping round trip
    keepalive_failures: int = 3  # pings in a row one connection may miss before it is closed (1 when another answers)
    holepunch: bool = True  # upgrade relayed connections to direct ones with DCUtR
    holepunch_timeout_s: float = 5.0  # how long a dial waits for one DCUtR attempt before going on relayed (the
    # attempt itself is never cancelled: it ends within its own io/dial timeouts below and upgrades late if it
    # succeeds); the first runs inside a dial: keep it below transport.dial_timeout_s
    holepunch_io_timeout_s: int = 5  # one read or write of the DCUtR exchange on the relayed stream (whole seconds)
    holepunch_dial_timeout_s: int = 5  # the simultaneous direct dials of one attempt (whole seconds)
    holepunch_retries: int = 3  # attempts per relayed peer before it stays relayed
    holepunch_backoff_s: float = 2.0  # wait before the next attempt, doubled per failed attempt

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.reachability not in ("auto", "public", "private"):
            raise ValueError(f"nat.reachability must be auto, public or private, got {self.reachability!r}")
        for name in ("autonat_timeout_s", "autonat_interval_s", "reachability_timeout_s", "reservation_timeout_s",
                     "relay_check_interval_s", "relay_retry_backoff_s", "relay_retry_backoff_max_s",
                     "relay_start_timeout_s", "direct_dial_timeout_s", "holepunch_timeout_s", "holepunch_backoff_s",
                     "keepalive_interval_s", "keepalive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"nat.{name} must be > 0, got {getattr(self, name)}")
        for name in ("autonat_confirmations", "autonat_peers", "relay_max_circuits", "relay_reservation_ttl_s",
                     "relay_circuit_bytes", "max_relays", "keepalive_failures", "holepunch_io_timeout_s",
                     "holepunch_dial_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"nat.{name} must be >= 1, got {getattr(self, name)}")
        if self.relay_max_reservations < 0 or self.relay_circuit_duration_s < 0 or self.holepunch_retries < 0:
            raise ValueError("nat.relay_max_reservations, relay_circuit_duration_s and holepunch_retries must be >= 0")
        if not 0 < self.reservation_renew_fraction < 1:
            raise ValueError(f"nat.reservation_renew_fraction must be in (0, 1), got {self.reservation_renew_fraction}")


@dataclass
class WebConfig:
    """The status page (`node.observability.web`): HTTP beside the Prometheus endpoint, off unless a port is set."""

    port: int = 0  # HTTP port of the status page (0 = no page; on 127.0.0.1 by default, see host)
    host: str = "127.0.0.1"  # interface the page listens on (0.0.0.0 shows it to the whole network)
    poll_s: float = 1.0  # how often an open page asks for a new snapshot
    chain_refresh_s: float = 5.0  # on-chain figures (terms, shares, claimable revenue) are re-read at most this often
    history: int = 2000  # most recent steps drawn in the loss and tokens/s curves
    graceful_s: float = 1.0  # at shutdown, time open requests get to finish

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"web.port must be in 0..65535, got {self.port}")
        for name in ("poll_s", "chain_refresh_s", "graceful_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"web.{name} must be > 0, got {getattr(self, name)}")
        if self.history < 1:
            raise ValueError(f"web.history must be >= 1, got {self.history}")


@dataclass
class NodeConfig:
    """Everything `run_node` needs."""

    data_dir: str = "~/.pmn/node"  # node key + peer key, checkpoints, progress files
    model: str = "tiny"  # sharding preset name, or a path to a JSON ModelConfig
    num_stages: int = 2  # pipeline depth the model is split into
    stage: str = "auto"  # "auto" (least-served stage) or a stage index as a string
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])  # libp2p listen multiaddrs
    bootstrap: list[str] = field(default_factory=list)  # multiaddrs with /p2p/<id> of peers to join through
    capacity: int = 1  # declared capacity (work units) announced to the swarm
    metrics_port: int = 0  # Prometheus HTTP port (0 = disabled)
    progress: bool = True  # show a live rich progress line on stderr
    optim_lr: float | None = None  # override of OptimConfig.lr (None = sharding default)
    corpus: str | None = None  # sharding.load_corpus source read by the first stage (None = the stdlib corpus)
    dataset: str | None = None  # JSON of the spec's [data] section (pmn node start writes it): prepared, hash-checked
    # token files instead of `corpus` (None = byte-level `corpus`, not pinned by the spec hash)
    linger: bool = False  # after the last step keep serving (inference, audits, announcements) until signalled
    device: str = "auto"  # compute device: auto (first CUDA device, else MPS, else CPU), cpu, cuda, cuda:N, mps
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)  # precision, optimizer kernel, memory
    transport: TransportConfig = field(default_factory=TransportConfig)  # activation protocol settings
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)  # peer discovery settings
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # schedule and fault settings
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)  # replicated-stage settings
    recipe: RecipeConfig = field(default_factory=RecipeConfig)  # optimiser, schedule, clipping, data order
    chain: ChainConfig = field(default_factory=ChainConfig)  # on-chain binding (off when chain.rpc_url is empty)
    nat: NatConfig = field(default_factory=NatConfig)  # reachability, circuit relay v2, hole punching
    web: WebConfig = field(default_factory=WebConfig)  # status page (off unless web.port is set)

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the fix."""
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.stage != "auto":
            try:
                s = int(self.stage)
            except ValueError as exc:
                raise ValueError(f"stage must be 'auto' or an integer, got {self.stage!r}") from exc
            if not 0 <= s < self.num_stages:
                raise ValueError(f"stage {s} out of range: num_stages is {self.num_stages}")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.dataset is not None and self.corpus is not None:
            raise ValueError("corpus and dataset are both set: the spec's dataset is what the node trains on, "
                             "drop --corpus")
        if not self.listen:
            raise ValueError("listen must name at least one multiaddr, e.g. /ip4/127.0.0.1/tcp/0")
        r = self.runtime
        if r.steps < 0 or r.num_microbatches < 1 or r.microbatch_size < 1:
            raise ValueError("runtime.steps must be >= 0, num_microbatches and microbatch_size >= 1")
        self.execution.validate()
        if r.grad_norm_timeout_s <= 0:
            raise ValueError(f"runtime.grad_norm_timeout_s must be > 0, got {r.grad_norm_timeout_s}")
        if self.recipe.grad_clip > 0 and self.replicas.enabled:
            raise ValueError("recipe.grad_clip needs the one-peer-per-stage runner: replicated stages do not exchange "
                             "gradient norms yet; set recipe.grad_clip = 0 or turn replicas.enabled off")
        if r.replica_averaging not in REPLICA_AVERAGING or r.powersgd_rank < 1:
            raise ValueError(f"runtime.replica_averaging must be dense, dense-bf16 or powersgd "
                             f"(got {r.replica_averaging!r}) "
                             f"and runtime.powersgd_rank >= 1 (got {r.powersgd_rank})")
        if type(r.powersgd_bits) is not int or r.powersgd_bits not in POWERSGD_BITS:
            raise ValueError(f"runtime.powersgd_bits must be 16 (bf16 factors), 8 (int8) or 4 (int4), "
                             f"got {r.powersgd_bits!r}")
        if r.replica_exchange not in REPLICA_EXCHANGE:
            raise ValueError(f"runtime.replica_exchange must be one of {', '.join(REPLICA_EXCHANGE)}, "
                             f"got {r.replica_exchange!r}")
        if type(r.powersgd_block_rank) is not int or r.powersgd_block_rank < 0:
            raise ValueError(f"runtime.powersgd_block_rank must be an integer >= 1, or 0 for runtime.powersgd_rank, "
                             f"got {r.powersgd_block_rank!r}")
        if type(r.powersgd_iterations) is not int or not 1 <= r.powersgd_iterations <= MAX_POWER_ITERATIONS:
            raise ValueError(f"runtime.powersgd_iterations must be an integer from 1 to {MAX_POWER_ITERATIONS}, "
                             f"got {r.powersgd_iterations!r}")
        if not r.eval_timeout_s > 0 or not r.eval_idle_timeout_s > 0 or r.eval_keep < 1:
            raise ValueError(f"runtime.eval_timeout_s and eval_idle_timeout_s must be > 0 and runtime.eval_keep >= 1, "
                             f"got {r.eval_timeout_s}, {r.eval_idle_timeout_s} "
                             f"and {r.eval_keep}")
        if r.eval_every < 0 or r.eval_batches < 1 or r.eval_seed < 0:
            raise ValueError(f"runtime.eval_every must be >= 0 (0 = off), eval_batches >= 1 and eval_seed >= 0; got "
                             f"{r.eval_every}, {r.eval_batches}, {r.eval_seed}")
        check_schedule(r.schedule, r.max_staleness, r.async_lookahead)
        if r.schedule == "async" and self.replicas.enabled and r.replica_exchange != "step":
            raise ValueError("runtime.schedule = async with replicas.enabled needs runtime.replica_exchange = step (one "
                             "contribution per replica and step, applied in step order while later steps run); got "
                             f"{r.replica_exchange!r}")
        if self.chain.rpc_url and self.replicas.enabled and (self.stage == "auto" or self.replicas.rebalance_period_s):
            raise ValueError("replicas on chain serve the stage the chain assigned them: set stage to it (--stage N) "
                             "and keep replicas.rebalance_period_s = 0 (a move is not assigned on chain, so the new "
                             "stage's peers would refuse the node and its audits would name the wrong stage)")
        self.transport.validate()
        self.discovery.validate()
        self.replicas.validate()
        self.chain.validate()
        self.nat.validate()
        self.web.validate()
