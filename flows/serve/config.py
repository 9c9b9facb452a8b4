"""The serve section: the OpenAI-compatible server (`gptflow serve`) and the pipeline's serve step.
Read by flows/serve/; composed into the pipeline's config by flows/config.py."""

from __future__ import annotations

from dataclasses import dataclass

from flows.configlib import check, check_finite


@dataclass(frozen=True)
class ServeConfig:
    """Ray Serve: the OpenAI-compatible HTTP server (`gptflow serve`) and the optional deploy
    step."""

    model: str | None = None
    """What to serve: NAME@ALIAS in the registry (default: <registry.name>@champion), followed as
    the alias moves; or a bundle directory, served as it is."""
    served_name: str | None = None
    """The model name clients send and /v1/models lists (default: the registered model's name)."""
    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 unless the server is meant to be reached from elsewhere."""
    port: int = 8000
    api_key_env: str = "GPTFLOW_API_KEY"
    """Environment variable holding the API key; when it is set, requests need
    `Authorization: Bearer <key>`."""
    allow_no_auth: bool = False
    """Serve on a non-loopback host without an API key (refused otherwise: auth fails closed)."""
    max_prompts: int = 32
    """Prompts in one completions request (a list prompt); past it, 400."""
    stall_s: float = 60.0
    """/healthz fails (503) when the decode loop has work but has not finished a step for this
    long."""
    max_batch_size: int = 16
    """Sequences decoded together in a replica (continuous batching); 1 turns batching off."""
    max_batch_tokens: int | None = None
    """Token budget of a replica's batch: prompt + max_tokens summed over running sequences
    (default: max_batch_size x context length)."""
    max_queue: int = 64
    """Requests waiting for a batch slot per replica; past it, 429 with Retry-After."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (default: the context length minus one)."""
    max_tokens_limit: int = 1024
    """Cap on a request's max_tokens."""
    max_n: int = 8
    """Cap on a request's n (completions per prompt)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 past it)."""
    request_timeout_s: float = 120.0
    """A request still generating after this long ends with a 504 (streams: an error event)."""
    poll_s: float = 10.0
    """How often a replica checks the registry alias it follows (0: never)."""
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    """Autoscaling target per replica (used when max_replicas > min_replicas)."""
    num_cpus: float = 1.0
    """CPUs per replica."""
    num_gpus: float = 0.0
    """GPUs per replica (the model runs on cuda when > 0)."""
    deploy: bool = False
    """Run the serve step after promote: (re)deploy on the configured Ray cluster."""
    knowledge: bool = False
    """Ground chat answers on the model's knowledge sources: BM25 retrieval over the verbalised
    statements of its dataset, the facts put in the prompt, the rows used named in the response."""
    knowledge_top_k: int = 3
    """Facts retrieved per question when `knowledge` is on."""
    access_log: bool = True
    """Ray Serve's access log: one line per request in the replicas' logs."""

    def __post_init__(self) -> None:
        check_finite(self)
        check(1 <= self.port <= 65535, "port", self.port, "in [1, 65535]")
        for key in (
            "max_batch_size",
            "max_queue",
            "max_tokens_limit",
            "max_n",
            "max_body_bytes",
            "min_replicas",
            "max_prompts",
            "knowledge_top_k",
        ):
            check(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
        check(
            self.max_replicas >= self.min_replicas,
            "max_replicas",
            self.max_replicas,
            ">= min_replicas",
        )
        for key in ("max_batch_tokens", "max_prompt_tokens"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, value, ">= 1 (or empty for the default)")
        for key in ("request_timeout_s", "target_ongoing_requests", "num_cpus", "stall_s"):
            check(getattr(self, key) > 0, key, getattr(self, key), "> 0")
        for key in ("poll_s", "num_gpus"):
            check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        check(
            bool(self.api_key_env), "api_key_env", self.api_key_env, "an environment variable name"
        )
