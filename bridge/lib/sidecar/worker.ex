defmodule Sidecar.Worker do
  @moduledoc """
  One sidecar worker: a GenServer that owns a Port running `python -m sidecar serve --stdio`.

  Frames are `{:packet, 4}` External Term Format terms (see the Python side,
  `sidecar/worker/stdio_server.py`). Each call gets an id; many can be in flight, replies are matched
  by id and handed to the waiting caller. The worker is routable once its `{:ready, ...}` handshake
  arrives. When the OS process exits, every call in flight gets a `:worker_crashed` error with the
  classified exit (and the last lines of its stderr), the worker's segments are unlinked, and this
  process stops so that its supervisor starts a replacement (after the pool's backoff).
  """
  use GenServer
  require Logger

  alias Sidecar.{Error, Exit, OsProcess, Pool.Manager, Shm, Telemetry, WorkerLog}

  # -- API (used by Sidecar) -----------------------------------------------------------------------

  def start_link(cfg), do: GenServer.start_link(__MODULE__, cfg)

  def child_spec(cfg) do
    %{
      id: {__MODULE__, cfg.slot},
      start: {__MODULE__, :start_link, [cfg]},
      restart: :permanent,
      shutdown: cfg.shutdown_grace_ms + 2_000
    }
  end

  @doc false
  # Sends a request and waits for its reply; `{:cancel, id}` goes to the worker when the caller gives up.
  def request(pid, req, timeout) do
    id = System.unique_integer([:positive])

    try do
      GenServer.call(pid, {:request, id, req}, timeout)
    catch
      :exit, {:timeout, _} ->
        GenServer.cast(pid, {:cancel, id})
        {:error, :timeout}

      :exit, {reason, _} ->
        {:error, {:down, reason}}
    end
  end

  @doc false
  def release(pid, ids) when is_list(ids) do
    GenServer.cast(pid, {:release, ids})
  end

  @doc false
  # Waits up to `timeout_ms` for OS process `os_pid` to exit, then SIGKILLs it; unlinks its segments.
  def ensure_stopped(os_pid, timeout_ms) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms

    unless await_exit(os_pid, deadline) do
      Logger.warning("sidecar worker #{os_pid} did not exit in #{timeout_ms} ms; sending SIGKILL")
      System.cmd("kill", ["-KILL", Integer.to_string(os_pid)], stderr_to_stdout: true)
      await_exit(os_pid, System.monotonic_time(:millisecond) + 1_000)
    end

    Shm.unlink_os_pid(os_pid)
  end

  defp await_exit(os_pid, deadline) do
    cond do
      not OsProcess.alive?(os_pid) ->
        true

      System.monotonic_time(:millisecond) >= deadline ->
        false

      true ->
        Process.sleep(5)
        await_exit(os_pid, deadline)
    end
  end

  # -- lifecycle -----------------------------------------------------------------------------------

  @impl true
  def init(cfg) do
    Process.flag(:trap_exit, true)
    crashes = Manager.consecutive_crashes(cfg.name, cfg.slot)
    delay = backoff(crashes, cfg.restart_backoff)

    state = %{
      cfg: cfg,
      pool: cfg.name,
      slot: cfg.slot,
      crashes: crashes,
      port: nil,
      os_pid: nil,
      status: :waiting,
      pending: %{},
      counter: nil,
      info: nil,
      log: nil,
      spawned_at: nil,
      ready_at: nil,
      start_timer: nil,
      kill_reason: nil
    }

    if crashes > 0 do
      Telemetry.execute([:sidecar, :pool, :restart], %{delay_ms: delay}, %{
        pool: cfg.name,
        slot: cfg.slot,
        consecutive_crashes: crashes
      })
    end

    if delay > 0 do
      Process.send_after(self(), :spawn, delay)
      {:ok, state}
    else
      {:ok, state, {:continue, :spawn}}
    end
  end

  # No delay for a first crash (a replacement should serve at once); then base * 2^(n-2), capped.
  defp backoff(n, _) when n <= 1, do: 0
  defp backoff(n, {base, max}), do: min(base * Integer.pow(2, min(n - 2, 30)), max)

  @impl true
  def handle_continue(:spawn, state), do: {:noreply, spawn_port(state)}

  defp spawn_port(%{cfg: cfg} = state) do
    log = if cfg.stderr == :capture, do: WorkerLog.new_path(state.pool, state.slot), else: nil
    {exe, args} = command(cfg, log)
    env = Enum.map(cfg.env, fn {k, v} -> {to_charlist(k), v && to_charlist(v)} end)

    try do
      port =
        Port.open({:spawn_executable, exe}, [
          :binary,
          {:packet, 4},
          :exit_status,
          :use_stdio,
          :hide,
          {:args, args},
          {:env, env}
        ])

      {:os_pid, os_pid} = Port.info(port, :os_pid)
      Manager.worker_spawned(state.pool, state.slot, self(), os_pid)
      timer = Process.send_after(self(), :start_timeout, cfg.start_timeout)

      %{
        state
        | port: port,
          os_pid: os_pid,
          log: log,
          status: :starting,
          spawned_at: System.monotonic_time(),
          start_timer: timer
      }
    rescue
      e in ErlangError ->
        # e.g. the python executable does not exist: count it as a crash so restarts back off.
        Logger.error(
          "sidecar worker #{inspect(state.pool)}/#{state.slot} cannot start #{exe}: #{inspect(e.original)}"
        )

        send(self(), {:spawn_failed, e.original})
        %{state | status: :failed}
    end
  end

  defp command(cfg, log) do
    python = cfg.python
    python = System.find_executable(python) || python

    worker_args =
      ["-m", "sidecar", "serve", "--stdio", "--run-id", Shm.run_id(), "--device", to_string(cfg.device)] ++
        Enum.flat_map(cfg.ops, &["--ops", &1]) ++
        if(cfg.debug_ops, do: ["--debug-ops"], else: []) ++ cfg.args

    if log, do: WorkerLog.wrap(log, [python | worker_args]), else: {python, worker_args}
  end

  # -- requests ------------------------------------------------------------------------------------

  @impl true
  def handle_call({:request, id, req}, from, %{status: :ready} = state) do
    send_frame(state, put_elem(req, 1, id))
    {:noreply, put_in(state.pending[id], {:call, from})}
  rescue
    # The port closed under us (its exit status is on the way): the caller routes elsewhere.
    ArgumentError -> {:reply, {:error, :not_ready}, state}
  end

  def handle_call({:request, _id, _req}, _from, state), do: {:reply, {:error, :not_ready}, state}

  def handle_call(:info, _from, state) do
    {:reply,
     %{
       slot: state.slot,
       pid: self(),
       os_pid: state.os_pid,
       status: state.status,
       in_flight: Enum.count(state.pending, &match?({_, {:call, _}}, &1)),
       consecutive_crashes: state.crashes,
       device: state.info && state.info[:device],
       stderr_log: state.log
     }, state}
  end

  @impl true
  def handle_cast({:cancel, id}, state) do
    if state.port && Map.has_key?(state.pending, id) do
      send_frame(state, {:cancel, id})
      {:noreply, %{state | pending: Map.put(state.pending, id, :abandoned)}}
    else
      {:noreply, state}
    end
  end

  def handle_cast({:release, ids}, %{status: :ready} = state),
    do: {:noreply, internal(state, {:release, 0, ids})}

  # A worker that is not running holds no leases any more (its segments went with it).
  def handle_cast({:release, _ids}, state), do: {:noreply, state}

  defp internal(state, req) do
    id = System.unique_integer([:positive])
    send_frame(state, put_elem(req, 1, id))
    put_in(state.pending[id], :internal)
  rescue
    ArgumentError -> state
  end

  defp send_frame(%{port: port}, term), do: Port.command(port, :erlang.term_to_binary(term))

  # -- port messages -------------------------------------------------------------------------------

  @impl true
  def handle_info({port, {:data, bin}}, %{port: port} = state) do
    {:noreply, handle_term(decode(bin), state)}
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    exited(status, state)
  end

  def handle_info(:spawn, state), do: {:noreply, spawn_port(state)}

  def handle_info({:spawn_failed, reason}, state) do
    Manager.worker_crashed(state.pool, state.slot, false)

    {:stop, {:shutdown, {:spawn_failed, reason}}, state}
  end

  def handle_info(:start_timeout, %{status: :starting, os_pid: os_pid} = state) do
    Logger.error("sidecar worker #{os_pid} sent no ready term in #{state.cfg.start_timeout} ms; killing it")
    System.cmd("kill", ["-KILL", Integer.to_string(os_pid)], stderr_to_stdout: true)
    {:noreply, %{state | kill_reason: :start_timeout}}
  end

  def handle_info(:start_timeout, state), do: {:noreply, state}
  def handle_info({:EXIT, port, _reason}, %{port: port} = state), do: {:noreply, state}
  def handle_info({:EXIT, port, _reason}, state) when is_port(port), do: {:noreply, state}
  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}
  def handle_info(_msg, state), do: {:noreply, state}

  defp decode(bin) do
    :erlang.binary_to_term(bin)
  rescue
    ArgumentError -> {:bad_frame, byte_size(bin)}
  end

  defp handle_term({:ready, os_pid, info}, state) do
    if state.start_timer, do: Process.cancel_timer(state.start_timer)
    counter = :counters.new(1, [:write_concurrency])
    table = state.pool

    for op <- info[:ops] || [], do: :ets.insert(table, {{:op, op}, op in (info[:idempotent] || [])})
    :ets.insert(table, {{:worker, state.slot}, self(), os_pid, counter})

    state = %{state | status: :ready, info: info, counter: counter, ready_at: System.monotonic_time()}

    state =
      if state.cfg.telemetry,
        do: internal(state, {:subscribe, 0, %{memory_interval_s: state.cfg.memory_interval_s}}),
        else: state

    Telemetry.execute(
      [:sidecar, :worker, :ready],
      %{startup: System.monotonic_time() - state.spawned_at},
      %{pool: state.pool, slot: state.slot, os_pid: os_pid, device: info[:device], restart: state.crashes > 0}
    )

    state
  end

  defp handle_term({tag, id, payload}, state) when tag in [:ok, :error] do
    {entry, pending} = Map.pop(state.pending, id)
    state = %{state | pending: pending}

    case entry do
      {:call, from} ->
        GenServer.reply(from, reply(tag, payload, state))

      :abandoned ->
        # The caller gave up: hand back what the call leased, nobody will.
        with :ok <- tag, %{leases: [_ | _] = ids} <- payload, do: send_frame(state, {:release, 0, ids})

      :internal ->
        if tag == :error,
          do: Logger.warning("sidecar worker #{state.os_pid}: #{inspect(Error.from_term(payload))}")

      nil ->
        if tag == :error,
          do: Logger.warning("sidecar worker #{state.os_pid} reports: #{inspect(Error.from_term(payload))}")
    end

    state
  end

  defp handle_term({:telemetry, event, measurements, metadata}, state) do
    measurements =
      case measurements do
        %{duration: ns} -> %{measurements | duration: System.convert_time_unit(ns, :nanosecond, :native)}
        m -> m
      end

    Telemetry.execute(event, measurements, Map.merge(metadata, %{pool: state.pool, slot: state.slot}))
    state
  end

  defp handle_term(other, state) do
    Logger.warning("sidecar worker #{state.os_pid} sent an unexpected term: #{inspect(other, limit: 10)}")
    state
  end

  defp reply(:ok, result, state), do: {:ok, result, state.os_pid}
  defp reply(:error, err, _state), do: {:error, Error.from_term(err)}

  # -- exit ----------------------------------------------------------------------------------------

  defp exited(status, state) do
    info = Exit.classify(status)
    info = if state.kill_reason, do: %{info | classification: state.kill_reason}, else: info
    tail = WorkerLog.tail(state.log, state.cfg.stderr_lines)

    err =
      Error.new(:worker_crashed, "sidecar worker #{state.os_pid} #{Exit.describe(info)}",
        exit_code: info.exit_code,
        signal: info.signal,
        classification: info.classification,
        stderr_tail: tail,
        pid: state.os_pid
      )

    level = if info.classification == :clean, do: :info, else: :warning
    Logger.log(level, Exception.message(err) <> tail_text(tail))

    :ets.match_delete(state.pool, {{:worker, state.slot}, self(), :_, :_})

    # Before the replies: a caller (and its handlers) sees the crash event before its error.
    Telemetry.execute([:sidecar, :pool, :crash], %{count: 1}, %{
      pool: state.pool,
      slot: state.slot,
      os_pid: state.os_pid,
      classification: info.classification,
      exit_code: info.exit_code,
      signal: info.signal,
      stderr_tail: tail
    })

    fail_pending(state, err)
    Shm.unlink_os_pid(state.os_pid)

    healthy? =
      state.ready_at != nil and
        System.convert_time_unit(System.monotonic_time() - state.ready_at, :native, :millisecond) >=
          state.cfg.healthy_after_ms

    Manager.worker_crashed(state.pool, state.slot, healthy?)

    {:stop, {:shutdown, {:worker_exit, info.classification}}, %{state | port: nil, status: :exited}}
  end

  defp tail_text([]), do: ""
  defp tail_text(lines), do: "; stderr:\n  " <> Enum.join(lines, "\n  ")

  defp fail_pending(state, err) do
    for {_id, {:call, from}} <- state.pending, do: GenServer.reply(from, {:error, err})
  end

  @impl true
  def terminate(reason, state) do
    if state.port do
      # Closing the port closes the worker's stdin: it finishes what runs and exits by itself.
      :ets.match_delete(state.pool, {{:worker, state.slot}, self(), :_, :_})
      fail_pending(state, Error.new(:cancelled, "the sidecar pool is shutting down (#{inspect(reason)})"))

      try do
        Port.close(state.port)
      rescue
        ArgumentError -> :ok
      end

      ensure_stopped(state.os_pid, state.cfg.shutdown_grace_ms)
    end

    if state.log, do: File.rm(state.log)
    :ok
  end
end
