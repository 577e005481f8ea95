defmodule Sidecar.Pool do
  @moduledoc """
  A supervised pool of sidecar workers (see `Sidecar.start_link/1` for the options).

  The tree, with `:rest_for_one` so the workers restart when the manager does:

      Sidecar.Pool (Supervisor, registered as the pool name)
        ├─ Sidecar.Pool.Manager   routing table (ETS), crash history, cleanup at shutdown
        └─ workers (Supervisor, :one_for_one)
             ├─ Sidecar.Worker slot 0   owns one Port: python -m sidecar serve --stdio
             └─ ...

  A worker that dies is restarted by its supervisor; the restart waits a backoff that grows with
  consecutive crashes of the same slot (none for the first, then `base * 2^(n-2)` ms up to `max`),
  so a worker that crashes at every start does not spin. The supervisor's own restart intensity is
  set high because the backoff, not the supervisor, limits restarts.
  """
  use Supervisor

  @defaults [
    workers: 2,
    python: nil,
    args: [],
    device: "cpu",
    ops: [],
    debug_ops: false,
    env: [],
    start_timeout: 60_000,
    timeout: 30_000,
    max_attempts: 2,
    retry_backoff_ms: 10,
    restart_backoff: {100, 5_000},
    healthy_after_ms: 5_000,
    shutdown_grace_ms: 5_000,
    stderr: :capture,
    stderr_lines: 20,
    telemetry: true,
    memory_interval_s: 5.0,
    read: true
  ]

  @doc false
  def defaults, do: @defaults

  def start_link(opts) do
    name = Keyword.get(opts, :name) || raise ArgumentError, "a pool needs a :name (an atom)"
    unless is_atom(name), do: raise(ArgumentError, ":name must be an atom, got #{inspect(name)}")
    cfg = Map.new(Keyword.merge(@defaults, opts))
    cfg = %{cfg | python: cfg.python || default_python()}
    Supervisor.start_link(__MODULE__, cfg, name: name)
  end

  def child_spec(opts) do
    %{
      id: Keyword.get(opts, :name, __MODULE__),
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor
    }
  end

  @doc "The python that runs workers: `$SIDECAR_PYTHON`, else `python3` on the PATH."
  def default_python do
    System.get_env("SIDECAR_PYTHON") || System.find_executable("python3") || "python3"
  end

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
    workers =
      for slot <- 0..(cfg.workers - 1) do
        Supervisor.child_spec({Sidecar.Worker, Map.put(cfg, :slot, slot)}, id: {:worker, slot})
      end

    children = [
      {Sidecar.Pool.Manager, cfg},
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
