defmodule Sidecar.Template do
  @moduledoc """
  The pool's pre-forked template: one Python process that imported torch (and the rest of what a
  worker needs) once, and forks workers on request, so a worker starts in tens of milliseconds
  instead of seconds. It is `python -m sidecar.host.template_process --listen-dir-prefix ...` (launch mode,
  see `sidecar/host/template_process.py`), listening on a unix socket in a private (0700) directory.

  A worker's Port runs `priv/sidecar_launch SOCKET serve --stdio ...`: the launcher hands its own
  stdin, stdout and stderr to the template (SCM_RIGHTS), the template forks a worker on exactly
  those pipes, and the launcher ends as the worker ends, so the Port's exit status is the worker's.

  Workers wait for the template while it starts (`launch/1` answers `:wait` and this process
  sends `{:sidecar_template, status}` when it is up or failed); a pool without a launcher binary
  (no C compiler at build time), with `template: false`, or whose template failed starts its
  workers cold (`python -m sidecar serve`). A template that dies takes its forked workers with it
  (they are its children, with PDEATHSIG): they are replaced while the template restarts.

  Memory: the template is one more Python process with torch imported (about the RSS of a worker,
  ~330 MB here), and the workers forked from it share its pages copy-on-write.
  """
  use GenServer
  require Logger

  alias Sidecar.{OsProcess, Shm, WorkerLog}

  @restart_backoff {1_000, 30_000}

  @spec start_link(map) :: GenServer.on_start()
  def start_link(cfg), do: GenServer.start_link(__MODULE__, cfg, name: name(cfg.name))

  @spec child_spec(map) :: Supervisor.child_spec()
  def child_spec(cfg), do: %{id: __MODULE__, start: {__MODULE__, :start_link, [cfg]}, shutdown: 5_000}

  @spec name(atom) :: atom
  def name(pool), do: Module.concat(pool, Template)

  @doc "The launcher executable, when it was built."
  @spec launcher() :: String.t() | nil
  def launcher do
    case :code.priv_dir(:sidecar_bridge) do
      {:error, _} ->
        nil

      dir ->
        path = Path.join(dir, "sidecar_launch")
        if File.exists?(path), do: path, else: nil
    end
  end

  @doc """
  How the calling worker should start: `{:fork, launcher, socket}`, `:cold`, or `:wait` (the
  template is starting: the caller gets `{:sidecar_template, :ready | :down}` when it is settled).
  """
  @spec launch(atom) :: {:fork, String.t(), String.t()} | :cold | :wait
  def launch(pool) do
    GenServer.call(name(pool), {:launch, self()})
  catch
    :exit, _ -> :cold
  end

  @doc "A launcher found nothing to talk to: restart the template (workers start cold meanwhile)."
  @spec launch_failed(atom) :: :ok
  def launch_failed(pool), do: GenServer.cast(name(pool), :launch_failed)

  @doc "The template's state: `%{status:, os_pid:, preload_ms:, rss_bytes:}`."
  @spec info(atom) :: map
  def info(pool), do: GenServer.call(name(pool), :info)

  @impl true
  def init(cfg) do
    Process.flag(:trap_exit, true)

    state = %{
      cfg: cfg,
      status: :starting,
      port: nil,
      os_pid: nil,
      socket: nil,
      launcher: launcher(),
      waiters: [],
      log: nil,
      preload_ms: nil,
      failures: 0,
      timer: nil,
      line: ""
    }

    cond do
      not cfg.template -> {:ok, %{state | status: :disabled}}
      state.launcher == nil -> {:ok, %{state | status: :unavailable}}
      true -> {:ok, start(state)}
    end
  end

  defp start(%{cfg: cfg} = state) do
    log = if cfg.stderr == :capture, do: WorkerLog.new_path(cfg.name, "template"), else: nil

    command = [
      cfg.python,
      "-m",
      "sidecar.host.template_process",
      "--listen-dir-prefix",
      WorkerLog.template_dir_prefix(),
      "--run-id",
      Shm.run_id(),
      "--host-pid",
      Integer.to_string(Shm.os_pid()),
      "--preload"
    ]

    {exe, args} = if log, do: WorkerLog.wrap(log, command), else: {hd(command), tl(command)}
    env = Sidecar.Pool.port_env(cfg.env)

    try do
      port =
        Port.open({:spawn_executable, System.find_executable(exe) || exe}, [
          :binary,
          {:line, 65_536},
          :exit_status,
          :use_stdio,
          :hide,
          {:args, args},
          {:env, env}
        ])

      {:os_pid, os_pid} = Port.info(port, :os_pid)
      timer = Process.send_after(self(), :start_timeout, cfg.start_timeout)
      %{state | status: :starting, port: port, os_pid: os_pid, log: log, timer: timer, line: ""}
    rescue
      e in ErlangError ->
        Logger.warning("sidecar pool #{inspect(cfg.name)}: cannot start the template: #{inspect(e.original)}")
        settle(%{state | status: :down, failures: state.failures + 1})
    end
  end

  @impl true
  def handle_call({:launch, pid}, _from, state) do
    case state.status do
      :ready -> {:reply, {:fork, state.launcher, state.socket}, state}
      :starting -> {:reply, :wait, %{state | waiters: [pid | state.waiters]}}
      _ -> {:reply, :cold, state}
    end
  end

  def handle_call(:info, _from, state) do
    rss = if state.os_pid && state.status == :ready, do: rss_bytes(state.os_pid), else: nil
    {:reply, %{status: state.status, os_pid: state.os_pid, preload_ms: state.preload_ms, rss_bytes: rss}, state}
  end

  @impl true
  def handle_cast(:launch_failed, %{status: :ready} = state) do
    Logger.warning("sidecar pool #{inspect(state.cfg.name)}: a worker could not be forked; restarting the template")
    OsProcess.signal(state.os_pid, :kill)
    {:noreply, state}
  end

  def handle_cast(:launch_failed, state), do: {:noreply, state}

  @impl true
  def handle_info({port, {:data, {:noeol, part}}}, %{port: port} = state), do: {:noreply, %{state | line: state.line <> part}}

  def handle_info({port, {:data, {:eol, part}}}, %{port: port} = state) do
    line = state.line <> part
    state = %{state | line: ""}

    # One JSON object: {"op": "ready", ..., "preload_s": 3.1, ..., "listen": "/tmp/.../launch.sock"}
    with [_, socket] <- Regex.run(~r/"listen": "([^"\\]+)"/, line),
         true <- String.contains?(line, ~s("op": "ready")) do
      if state.timer, do: Process.cancel_timer(state.timer)
      preload = with [_, s] <- Regex.run(~r/"preload_s": ([0-9.eE+-]+)/, line), {f, _} <- Float.parse(s), do: round(f * 1000)
      Logger.info("sidecar pool #{inspect(state.cfg.name)}: template #{state.os_pid} ready (preload #{inspect(preload)} ms)")
      {:noreply, settle(%{state | status: :ready, socket: socket, preload_ms: preload, failures: 0})}
    else
      _ -> {:noreply, state}
    end
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    tail = WorkerLog.tail(state.log, state.cfg.stderr_lines)
    if state.log, do: File.rm(state.log)

    Logger.warning(
      "sidecar pool #{inspect(state.cfg.name)}: template #{state.os_pid} exited (status #{status}); " <>
        "workers start cold until it is back" <> if(tail == [], do: "", else: ":\n  " <> Enum.join(tail, "\n  "))
    )

    failures = state.failures + 1
    {base, cap} = @restart_backoff
    Process.send_after(self(), :restart, min(base * Integer.pow(2, min(failures - 1, 10)), cap))
    {:noreply, settle(%{state | status: :down, port: nil, socket: nil, log: nil, failures: failures})}
  end

  def handle_info(:restart, %{status: :down} = state), do: {:noreply, start(state)}

  def handle_info(:start_timeout, %{status: :starting, os_pid: os_pid} = state) when is_integer(os_pid) do
    Logger.warning("sidecar pool #{inspect(state.cfg.name)}: template #{os_pid} not ready in #{state.cfg.start_timeout} ms; killing it")
    OsProcess.signal(os_pid, :kill)
    {:noreply, state}
  end

  def handle_info(_msg, state), do: {:noreply, state}

  # Tells the workers that waited how it went.
  defp settle(state) do
    for pid <- state.waiters, do: send(pid, {:sidecar_template, state.status})
    %{state | waiters: []}
  end

  @impl true
  def terminate(_reason, state) do
    # The workers stopped before us. Closing its stdin ends the template: it kills what is left of
    # its children and removes its socket directory.
    if state.port do
      try do
        Port.close(state.port)
      rescue
        ArgumentError -> :ok
      end
    end

    if state.log, do: File.rm(state.log)
    :ok
  end

  defp rss_bytes(os_pid) do
    with {:ok, text} <- File.read("/proc/#{os_pid}/status"),
         [_, kb] <- Regex.run(~r/^VmRSS:\s+(\d+) kB$/m, text) do
      String.to_integer(kb) * 1024
    else
      _ -> nil
    end
  end
end
