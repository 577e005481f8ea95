defmodule Sidecar.Pool do
  @moduledoc """
  A supervised pool of sidecar workers (see `Sidecar.start_link/1` for the options).

  The tree, with `:rest_for_one` so that everything after a restarted child restarts too:

      Sidecar.Pool (Supervisor, registered as the pool name)
        ├─ Registry <pool>.Registry   routing: ready workers register under :ready; config and the
        │                              ops' idempotency live in its meta
        ├─ Sidecar.Pool.Manager       restart backoff, circuit breaker, callers waiting for a ready
        │                              worker, cleanup of workers that die without their own
        ├─ Sidecar.Template           the pre-forked template that replacement workers fork from
        └─ workers (Supervisor, :one_for_one)
             ├─ Sidecar.Worker slot 0   owns one Port: the worker's stdin/stdout
             └─ ...

  A worker that dies is restarted by its supervisor; the manager decides when it may start again
  (at once for a first crash, then after a backoff, or only after the breaker's probe). The
  supervisor's own restart intensity is set high because the manager, not the supervisor, limits
  restarts.
  """
  use Supervisor

  @defaults [
    name: nil,
    workers: 2,
    python: nil,
    args: [],
    device: "cpu",
    ops: [],
    debug_ops: false,
    env: [],
    start_timeout: 60_000,
    timeout: 30_000,
    max_attempts: 3,
    retry_backoff: {10, 1_000},
    restart_backoff: {100, 5_000},
    healthy_after_ms: 5_000,
    shutdown_grace_ms: 5_000,
    stderr: :capture,
    stderr_lines: 20,
    telemetry: true,
    memory_interval_s: 5.0,
    read: true,
    breaker: [],
    health: [],
    template: true,
    spares: 0
  ]

  @health_defaults [interval_ms: 5_000, timeout_ms: 2_000, failures: 3]

  @type option ::
          {:name, atom}
          | {:workers, pos_integer}
          | {:python, String.t() | nil}
          | {:args, [String.t()]}
          | {:device, String.t()}
          | {:ops, [String.t()]}
          | {:debug_ops, boolean}
          | {:env, [{String.t(), String.t() | nil}]}
          | {:start_timeout, pos_integer}
          | {:timeout, pos_integer}
          | {:max_attempts, pos_integer}
          | {:retry_backoff, {non_neg_integer, non_neg_integer}}
          | {:restart_backoff, {non_neg_integer, non_neg_integer}}
          | {:healthy_after_ms, non_neg_integer}
          | {:shutdown_grace_ms, non_neg_integer}
          | {:stderr, :capture | :inherit}
          | {:stderr_lines, non_neg_integer}
          | {:telemetry, boolean}
          | {:memory_interval_s, number}
          | {:read, boolean | :copy}
          | {:breaker, keyword}
          | {:health, keyword}
          | {:template, boolean}
          | {:spares, non_neg_integer}

  @doc false
  @spec defaults() :: keyword
  def defaults, do: @defaults

  @doc "Starts a pool (see `Sidecar.start_link/1`); an unknown or malformed option raises ArgumentError."
  @spec start_link([option]) :: Supervisor.on_start()
  def start_link(opts) do
    cfg = config!(opts)
    Supervisor.start_link(__MODULE__, cfg, name: cfg.name)
  end

  @doc false
  @spec child_spec([option]) :: Supervisor.child_spec()
  def child_spec(opts) do
    %{id: Keyword.get(opts, :name, __MODULE__), start: {__MODULE__, :start_link, [opts]}, type: :supervisor}
  end

  @doc "The registry that routes calls of `pool`."
  @spec registry(atom) :: atom
  def registry(pool), do: Module.concat(pool, Registry)

  @doc """
  The pool's `env:` as a Port wants it: `{name, value}` sets a variable, `{name, nil}` removes it
  from what the worker inherits.
  """
  @spec port_env([{String.t(), String.t() | nil}]) :: [{charlist, charlist | false}]
  def port_env(env), do: Enum.map(env, fn {k, v} -> {to_charlist(k), if(v == nil, do: false, else: to_charlist(v))} end)

  @doc "The python that runs workers: `$SIDECAR_PYTHON`, else `python3` on the PATH."
  @spec default_python() :: String.t()
  def default_python do
    System.get_env("SIDECAR_PYTHON") || System.find_executable("python3") || "python3"
  end

  @doc false
  # Validated options as the map every part of the pool reads.
  @spec config!(keyword) :: map
  def config!(opts) do
    opts = Keyword.validate!(opts, @defaults)
    name = opts[:name] || raise ArgumentError, "a pool needs a :name (an atom)"
    unless is_atom(name), do: raise(ArgumentError, ":name must be an atom, got #{inspect(name)}")
    check!(opts, :workers, &(is_integer(&1) and &1 >= 1), "an integer >= 1")
    check!(opts, :max_attempts, &(is_integer(&1) and &1 >= 1), "an integer >= 1")
    check!(opts, :spares, &(is_integer(&1) and &1 >= 0), "an integer >= 0")
    check!(opts, :timeout, &(is_integer(&1) and &1 > 0), "a positive integer (ms)")
    check!(opts, :start_timeout, &(is_integer(&1) and &1 > 0), "a positive integer (ms)")
    check!(opts, :retry_backoff, &pair?/1, "{initial_ms, cap_ms} with 0 <= initial <= cap")
    check!(opts, :restart_backoff, &pair?/1, "{initial_ms, cap_ms} with 0 <= initial <= cap")
    check!(opts, :stderr, &(&1 in [:capture, :inherit]), ":capture or :inherit")
    check!(opts, :read, &(&1 in [true, false, :copy]), "true, false or :copy")
    health = Keyword.validate!(opts[:health], @health_defaults)

    for {k, v} <- health, not (is_integer(v) and v >= 0),
        do: raise(ArgumentError, "health #{k} must be an integer >= 0, got #{inspect(v)}")

    # Sidecar.Breaker.new/1 validates its own options; built here so a bad one fails the start.
    _ = Sidecar.Breaker.new(opts[:breaker])

    opts
    |> Map.new()
    |> Map.merge(%{python: opts[:python] || default_python(), health: Map.new(health), registry: registry(name)})
  end

  defp check!(opts, key, ok?, what) do
    unless ok?.(opts[key]), do: raise(ArgumentError, "#{key} must be #{what}, got #{inspect(opts[key])}")
  end

  defp pair?({a, b}) when is_integer(a) and is_integer(b), do: a >= 0 and b >= a
  defp pair?(_), do: false

  @impl true
  def init(cfg) do
    # A VM that is ending starts no pool (a parent supervisor may restart one it saw stop).
    if Sidecar.Cleanup.exiting?() do
      :ignore
    else
      :ok = Sidecar.Cleanup.track_pool(self())
      init_tree(cfg)
    end
  end

  defp init_tree(cfg) do
    # Spares after the slots: the slots' first workers start first.
    slots = Enum.to_list(0..(cfg.workers - 1)) ++ for(i <- 0..(cfg.spares - 1)//1, do: {:spare, i})

    workers =
      for slot <- slots do
        Supervisor.child_spec({Sidecar.Worker, Map.put(cfg, :slot, slot)}, id: {:worker, slot})
      end

    children = [
      {Registry, keys: :duplicate, name: cfg.registry},
      {Sidecar.Pool.Manager, cfg},
      {Sidecar.Template, cfg},
      %{
        id: :workers,
        type: :supervisor,
        start:
          {Supervisor, :start_link,
           [workers, [strategy: :one_for_one, max_restarts: 1_000_000, max_seconds: 1]]}
      }
    ]

    Supervisor.init(children, strategy: :rest_for_one)
  end
end
