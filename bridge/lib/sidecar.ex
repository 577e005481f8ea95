defmodule Sidecar do
  @moduledoc """
  Run PyTorch/NumPy ops in a pool of sidecar worker processes from the BEAM, with tensors moving
  through shared memory, structured errors, and crashes absorbed.

      children = [
        {Sidecar, name: MyApp.Sidecar, workers: 2, python: "/srv/app/.venv/bin/python"}
      ]

      {:ok, a} = Sidecar.Tensor.from_binary(bytes, "float32", [1024, 1024])
      {:ok, %Sidecar.Result{outputs: [sum]}} = Sidecar.call(MyApp.Sidecar, "add", [a, a])
      Sidecar.Tensor.to_binary!(sum)

  Errors come back as `{:error, %Sidecar.Error{kind: ...}}` (see `Sidecar.Error`); a worker that dies
  mid-call yields `kind: :worker_crashed` with the classified exit, and idempotent calls are retried
  on another worker first. Telemetry: `Sidecar.Telemetry`.

  Pool options (`start_link/1`, `child_spec/1`; an unknown or malformed one raises ArgumentError):

    * `:name` (required) - an atom naming the pool; pass it to `call/4` and friends.
    * `:workers` - number of worker processes (default 2).
    * `:python` - the interpreter that has the `sidecar` package (default `$SIDECAR_PYTHON`, else
      `python3` on the PATH).
    * `:device` - `"cpu"`, `"cuda"`, `"cuda:1"`, `"auto"`, ... (default `"cpu"`).
    * `:ops` - Python modules with `@sidecar.op` functions to load (`--ops`).
    * `:debug_ops` - also load the crash/sleep test ops (default false).
    * `:args` - extra `sidecar serve` arguments, e.g. `["--max-concurrency", "8"]`.
    * `:env` - extra environment, `[{"OMP_NUM_THREADS", "4"}]`.
    * `:timeout` - default call timeout in ms (30 000).
    * `:max_attempts` - tries of an idempotent call whose worker died (3; a call that crashed two
      workers is a poison call and fails, see `call/4`).
    * `:retry_backoff` - `{initial_ms, cap_ms}` (`{10, 1000}`): retry n waits a uniform 0.5-1 of
      `min(cap, initial * 2^(n-1))`.
    * `:start_timeout` - ms a worker may take to send its ready term (60 000).
    * `:restart_backoff` - `{base_ms, max_ms}` (`{100, 5000}`); `:healthy_after_ms` (5000) - a worker
      that served a call, or ran this long, before crashing restarts without delay.
    * `:breaker` - `[threshold: 5, window_ms: 30_000, cooldown_ms: 5_000]` (`Sidecar.Breaker`).
    * `:health` - `[interval_ms: 5_000, timeout_ms: 2_000, failures: 3]`: a ready worker that misses
      `failures` pings in a row is killed (`:unresponsive`) and replaced; `interval_ms: 0` turns it off.
    * `:template` - fork workers from a template process that imported torch once (default true;
      `Sidecar.Template`): a replacement serves in tens of milliseconds instead of seconds.
    * `:shutdown_grace_ms` - how long a stopping worker may finish its calls (5000).
    * `:stderr` - `:capture` (default; the last `:stderr_lines` lines go into crash errors) or `:inherit`.
    * `:telemetry` - subscribe to worker events (default true); `:memory_interval_s` (5.0).
    * `:read` - default of the per-call `:read` option (true).
  """

  require Logger

  alias Sidecar.{Error, Result, Session, Telemetry, Tensor, Worker}

  @type pool :: atom

  @doc "Starts a pool under the caller (use `child_spec/1` in a supervision tree)."
  @spec start_link([Sidecar.Pool.option()]) :: Supervisor.on_start()
  defdelegate start_link(opts), to: Sidecar.Pool

  @doc false
  @spec child_spec([Sidecar.Pool.option()]) :: Supervisor.child_spec()
  def child_spec(opts), do: Sidecar.Pool.child_spec(opts)

  @doc "Stops a pool: workers finish what runs, exit, and every segment of the pool is unlinked."
  @spec stop(pool, timeout) :: :ok
  def stop(pool, timeout \\ :infinity), do: Supervisor.stop(pool, :normal, timeout)

  # Tensors at least this big are never sent inside the message when they lie in shared memory.
  @inline_limit 65_536

  @call_options [:attrs, :timeout, :idempotent, :max_attempts, :read, :placement, :out, :release, :request_id,
                 :inline_threshold, :alias_inputs]

  @doc """
  Runs `op` on `inputs` in an idle worker of `pool`.

  Inputs are `%Sidecar.Tensor{}` values, numbers, binaries (strings), atoms, lists and maps;
  `{:bytes, bin}` passes raw bytes that are not text.

  Options (an unknown one raises ArgumentError):
    * `:attrs` - op parameters, a map or keyword list (`attrs: [dim: 1]`).
    * `:timeout` - ms for the whole call, retries included (pool default 30 000); on expiry the call
      is cancelled in the worker and `{:error, %Sidecar.Error{kind: :cancelled}}` returned.
    * `:idempotent` - may the call be retried on another worker after a crash? Default: what the op
      declares (`Sidecar.list_ops/1`).
    * `:max_attempts` - tries for an idempotent call whose worker died (pool default 3).
    * `:read` - `true` (pool default): tensor outputs come back as binaries (`{:data, bin}`); with
      the NIF those binaries *are* the worker's memory (no copy) and the lease is given back when
      the last of them is garbage collected; without it they are read (one copy) and the lease
      released before returning. `:copy`: always a copy, lease released at once. `false`: outputs
      stay in the worker's segments and the result holds their `leases` until `release/1`.
    * `:placement` - `:auto` (default), `:shm`, `:inline`, `:device`, `:out`.
    * `:out` - VM tensors (`Sidecar.Tensor.alloc/3`) the worker writes the outputs into.
    * `:release` - lease ids to hand back, piggybacked on this call.
    * `:request_id` - a string echoed in telemetry and errors.
    * `:inline_threshold` - outputs below this many bytes come back inside the reply.
    * `:alias_inputs` - an output that is a view of an input in a VM segment (`identity`, a
      reshape) comes back as that range of the VM's segment: no copy, no lease (default false).
      Such an output, like an `out:` one, is the VM's memory: `Sidecar.Tensor.view/1` shows it.

  Retries and poison calls: a call whose worker died is retried on another worker (idempotent
  calls, up to `max_attempts` tries, after a backoff with jitter). A crash the work can have caused
  (`Sidecar.Exit.caused_by_work?/1`: a native crash, a confirmed OOM, a taint, a Python error) counts
  against every call that was in flight on that worker, since which of them caused it cannot be
  known; an external SIGKILL or SIGTERM counts against none. A call that crashed two workers is a
  poison call: it fails with `%Sidecar.Error{kind: :worker_crashed}` whose `crashes` lists every
  worker death it went through (`%{pid:, classification:, exit_code:, signal:, caused:}`, oldest
  first) and whose message names the two; it is never sent to a third worker.

  While the pool's circuit breaker is open (`Sidecar.Breaker`), a call that finds no ready worker
  fails at once with `kind: :circuit_open` (with the last crash's fields); ready workers serve
  calls as usual.
  """
  @spec call(pool | Session.t(), String.t(), list, keyword) :: {:ok, Result.t()} | {:error, Error.t()}
  def call(pool, op, inputs \\ [], opts \\ [])

  # A session's call: on the session's worker only, with its session id (Sidecar.Session).
  def call(%Session{} = s, op, inputs, opts) when is_list(inputs),
    do: call(s.pool, op, inputs, [{:session, s} | Keyword.validate!(opts, @call_options)])

  def call(pool, op, inputs, opts) when is_list(inputs) do
    {session, opts} = Keyword.pop(opts, :session)
    opts = Keyword.validate!(opts, @call_options)
    t0 = System.monotonic_time()

    with {:ok, cfg} <- config(pool) do
      timeout = Keyword.get(opts, :timeout, cfg.timeout)
      deadline = System.monotonic_time(:millisecond) + timeout
      idempotent = Keyword.get_lazy(opts, :idempotent, fn -> idempotent_op?(pool, op) end)
      attempts = if idempotent, do: Keyword.get(opts, :max_attempts, cfg.max_attempts), else: 1
      read = Keyword.get(opts, :read, cfg.read)
      # The `out:` destinations are encoded only for what they keep alive (wire_opts sends them).
      tensors = inputs ++ Keyword.get(opts, :out, [])
      {terms, keep} = encode_inputs(tensors)
      terms = Enum.take(terms, length(inputs))

      wire = wire_opts(opts, idempotent)
      wire = if session, do: Map.merge(wire, %{session_id: session.id, session_ttl_s: session.ttl_s}), else: wire
      req = {:call, nil, to_string(op), terms, Map.new(Keyword.get(opts, :attrs, %{})), wire}

      ctx = %{
        pool: pool,
        op: to_string(op),
        deadline: deadline,
        timeout: timeout,
        max: attempts,
        cfg: cfg,
        read: if(read == true and Sidecar.Native.loaded?(), do: :zero_copy, else: :raw),
        keep: keep
      }

      sent = if session, do: pinned(ctx, req, session), else: attempt(ctx, req, [])

      with {:ok, term, worker, os_pid} <- sent do
        result(term, worker, os_pid, read, t0, own_mappings(tensors))
      end
    end
  end

  @doc """
  Runs a streaming op (a Python generator) on an idle worker of `pool`: an Elixir `Stream` of its
  chunks, produced as the consumer takes them (see `Sidecar.Stream` for flow control,
  cancellation and failures). Each element is a chunk's value (a list when the op yielded a
  tuple); tensors come back as binaries (copied out of the worker's memory, its lease released).

      pool |> Sidecar.stream("count_up", [], attrs: [n: 1000]) |> Enum.take(10)

  Options: `:attrs`, `:timeout` (ms for the whole stream), `:idempotent`, `:request_id`,
  `:max_chunks` / `:max_bytes` (the flow-control window; worker defaults 16 chunks, 64 MiB).
  Failures raise `Sidecar.Error` from the enumeration, after the chunks delivered before them.
  """
  @spec stream(pool, String.t(), list, keyword) :: Enumerable.t()
  def stream(pool, op, inputs \\ [], opts \\ []) when is_list(inputs), do: Sidecar.Stream.new(pool, op, inputs, opts)

  @doc "Like `call/4`, returning the result or raising `Sidecar.Error`."
  @spec call!(pool, String.t(), list, keyword) :: Result.t()
  def call!(pool, op, inputs \\ [], opts \\ []) do
    case call(pool, op, inputs, opts) do
      {:ok, r} -> r
      {:error, e} -> raise e
    end
  end

  @doc """
  Hands back the leases a `read: false` result (or a leased tensor) holds. A lease whose memory a
  binary still shows (`Sidecar.Tensor.to_binary/1` with the NIF) is released once that binary is
  garbage collected, never before.
  """
  @spec release(Result.t() | Tensor.t()) :: :ok
  def release(%Result{leases: [], worker: _}), do: :ok
  def release(%Result{leases: ids, worker: worker}), do: Worker.release(worker, ids)
  def release(%Tensor{} = t), do: Tensor.free(t)

  @doc "Every op the workers serve: name, doc, arity, idempotency, attrs, module."
  @spec list_ops(pool, keyword) :: {:ok, [map]} | {:error, Error.t()}
  def list_ops(pool, opts \\ []), do: control(pool, {:list_ops, nil}, Keyword.validate!(opts, [:timeout]))

  @doc "What a worker sees: platform, CPU, CUDA devices, MPS, chosen device, versions, identity."
  @spec hardware(pool, keyword) :: {:ok, map} | {:error, Error.t()}
  def hardware(pool, opts \\ []), do: control(pool, {:hardware, nil}, Keyword.validate!(opts, [:timeout]))

  @doc """
  Per-worker status: slot, pid, os_pid, status (`:ready`, `:starting`, `:waiting` for a restart
  backoff, `:waiting_template`, `:held` by an open breaker), `via` (`:fork` from the template or
  `:cold`), calls in flight, leases held, consecutive crashes, missed health checks, the last
  health check (`health`: `:serving`, `:busy` = no answer but computing, e.g. an op holding the
  GIL in C, never killed for it; `:no_answer`), device.
  """
  @spec status(pool) :: [map]
  def status(pool) do
    workers_sup =
      Enum.find_value(Supervisor.which_children(pool), fn
        {:workers, pid, _, _} -> pid
        _ -> nil
      end)

    for {_, pid, _, _} <- Supervisor.which_children(workers_sup), is_pid(pid) do
      try do
        GenServer.call(pid, :info, 5_000)
      catch
        :exit, _ -> %{pid: pid, status: :unavailable}
      end
    end
    |> Enum.sort_by(& &1[:slot])
  end

  @doc """
  The pool as a whole: its circuit breaker (`state`, `recent_failures`, `retry_after_ms`, ...), its
  template (`status`, `os_pid`, `preload_ms`, `rss_bytes`) and whether the NIF is loaded.
  """
  @spec info(pool) :: %{breaker: map, template: map, native: term}
  def info(pool) do
    %{
      breaker: Sidecar.Pool.Manager.breaker(pool),
      template: Sidecar.Template.info(pool),
      native: Sidecar.Native.status()
    }
  end

  @doc """
  Waits until `count` workers (default: all) are ready. `{:error, %Sidecar.Error{}}` on timeout,
  or at once when no worker could start (the error says why: the worker's exit and stderr).
  """
  @spec await_ready(pool, pos_integer | :all, timeout) :: :ok | {:error, Error.t()}
  def await_ready(pool, count \\ :all, timeout \\ 60_000) do
    with {:ok, cfg} <- config(pool) do
      Sidecar.Pool.Manager.await(pool, if(count == :all, do: cfg.workers, else: count), :ready, timeout)
    end
  end

  # -- resources and sessions (Sidecar.Resources, Sidecar.Session) ---------------------------------

  @doc """
  Loads a resource on every worker (and spare) of `pool`: `loader` (declared with
  `@sidecar.resource` in an ops module: its name or "module.function") runs with `args:` and its
  object stays resident as `name`; replacement workers replay it before they serve. See
  `Sidecar.Resources.load/4`.
  """
  @spec load(pool, String.t(), String.t(), keyword) :: {:ok, [map]} | {:error, Error.t()}
  defdelegate load(pool, name, loader, opts \\ []), to: Sidecar.Resources

  @doc "Frees a resource on every worker and forgets its recipe (`Sidecar.Resources.unload/3`)."
  @spec unload(pool, String.t(), keyword) :: {:ok, map} | {:error, Error.t()}
  defdelegate unload(pool, name, opts \\ []), to: Sidecar.Resources

  @doc "The pool's resource recipes (`%{name:, loader:, kwargs:}`)."
  @spec resources(pool) :: [map]
  def resources(pool), do: Sidecar.Resources.list(pool)

  @doc """
  A session pinned to the idlest ready worker (`Sidecar.Session`): pass it to `call/4` instead of
  the pool. Options: `:ttl_s` (idle seconds after which the worker frees its state), `:timeout`.
  """
  @spec session(pool, keyword) :: {:ok, Session.t()} | {:error, Error.t()}
  def session(pool, opts \\ []), do: Session.open(pool, opts)

  @doc "Ends a session: its worker frees its state."
  @spec close_session(Session.t()) :: :ok
  defdelegate close_session(session), to: Session, as: :close

  # A session's call goes to its worker or nowhere: no retry elsewhere (its state is there).
  defp pinned(ctx, req, %Session{worker: pid} = s) do
    if Process.alive?(pid) do
      case Worker.request(pid, req, max(remaining(ctx), 1), ctx.read, ctx.keep) do
        {:ok, term, os_pid} -> {:ok, term, pid, os_pid}
        {:error, :timeout} -> {:error, timeout_error(ctx)}
        {:error, %Error{kind: :worker_crashed} = crash} -> {:error, Session.lost(s, crash)}
        {:error, %Error{}} = err -> err
        {:error, _gone} -> {:error, Session.lost(s, nil)}
      end
    else
      {:error, Session.lost(s, nil)}
    end
  end

  # -- routing and retries -------------------------------------------------------------------------

  # A call that crashed this many workers (crashes the work can have caused) is a poison call:
  # failed, never sent to another worker.
  @poison_crashes 2

  # `crashes` are the worker deaths this call went through (oldest first); every retry follows
  # one, so their number is the number of tries so far.
  defp attempt(ctx, req, crashes, avoid \\ []) do
    with {:ok, pid, counter} <- pick(ctx, avoid) do
      :counters.add(counter, 1, 1)
      res = Worker.request(pid, req, max(remaining(ctx), 1), ctx.read, ctx.keep)
      :counters.sub(counter, 1, 1)

      case res do
        {:ok, term, os_pid} ->
          {:ok, term, pid, os_pid}

        {:error, :not_ready} ->
          # Lost a race with a worker going down: route again, this try does not count.
          attempt(ctx, req, crashes, [pid | avoid])

        {:error, :timeout} ->
          {:error, timeout_error(ctx)}

        {:error, {:down, reason}} ->
          crashed(ctx, req, crashes, avoid, pid, down_error(ctx, reason))

        {:error, %Error{kind: :worker_crashed} = err} ->
          crashed(ctx, req, crashes, avoid, pid, %{err | op: err.op || ctx.op})

        {:error, %Error{}} = err ->
          err
      end
    end
  end

  defp crashed(ctx, req, crashes, avoid, pid, err) do
    crash =
      err
      |> Map.take([:pid, :classification, :exit_code, :signal])
      |> Map.put(:caused, Sidecar.Exit.caused_by_work?(err.classification))

    crashes = crashes ++ [crash]
    tries = length(crashes)

    cond do
      Enum.count(crashes, & &1.caused) >= @poison_crashes ->
        {:error, poison_error(ctx, err, crashes)}

      tries < ctx.max and remaining(ctx) > 0 ->
        Telemetry.execute([:sidecar, :pool, :retry], %{attempt: tries + 1}, %{
          pool: ctx.pool,
          op: ctx.op,
          reason: err.classification || :worker_crashed,
          os_pid: err.pid
        })

        Process.sleep(min(retry_delay(ctx.cfg.retry_backoff, tries), max(remaining(ctx), 0)))
        attempt(ctx, req, crashes, [pid | avoid])

      true ->
        {:error, %{err | crashes: crashes}}
    end
  end

  # Exponential with jitter (uniform 0.5-1 of min(cap, initial * 2^(n-1))), so that the retries of
  # many callers do not land at once.
  defp retry_delay({initial, cap}, n) do
    base = min(cap, initial * Integer.pow(2, min(n - 1, 30)))
    div(base, 2) + :rand.uniform(div(base, 2) + 1) - 1
  end

  defp poison_error(ctx, last, crashes) do
    named =
      crashes
      |> Enum.filter(& &1.caused)
      |> Enum.map_join(", ", fn c -> "pid #{c.pid || "?"} (#{c.classification || :worker_crashed})" end)

    message =
      "#{ctx.op} crashed #{Enum.count(crashes, & &1.caused)} workers: #{named}; a poison call is not sent to another worker"

    Logger.warning("sidecar pool #{inspect(ctx.pool)}: #{message}")
    %{last | message: message, crashes: crashes}
  end

  # The idlest ready worker (fewest calls in flight), ties broken at random. When none is ready,
  # the pool's manager answers once one is (or why none will be: an open breaker, a failed start).
  @doc false
  def pick(ctx, avoid) do
    workers = ready_workers(ctx.pool)

    candidates =
      case Enum.reject(workers, fn {pid, _} -> pid in avoid end) do
        [] -> workers
        some -> some
      end

    cond do
      candidates != [] ->
        {pid, %{counter: counter}} =
          candidates |> Enum.shuffle() |> Enum.min_by(fn {_, w} -> :counters.get(w.counter, 1) end)

        {:ok, pid, counter}

      remaining(ctx) <= 0 ->
        {:error,
         Error.new(:cancelled, "no worker of #{inspect(ctx.pool)} was ready within #{ctx.timeout} ms", op: ctx.op)}

      true ->
        case Sidecar.Pool.Manager.await(ctx.pool, 1, :call, remaining(ctx)) do
          :ok -> pick(ctx, avoid)
          {:error, %Error{} = e} -> {:error, %{e | op: ctx.op}}
        end
    end
  end

  defp ready_workers(pool) do
    Registry.lookup(Sidecar.Pool.registry(pool), :ready)
  rescue
    ArgumentError -> []
  end

  defp remaining(ctx), do: ctx.deadline - System.monotonic_time(:millisecond)

  defp timeout_error(ctx),
    do: Error.new(:cancelled, "call to #{ctx.op} timed out after #{ctx.timeout} ms", op: ctx.op)

  # The worker's GenServer went away mid-call (not its OS process): nothing says the work did it.
  defp down_error(ctx, reason),
    do: Error.new(:worker_crashed, "the worker process serving #{ctx.op} went down: #{inspect(reason)}", op: ctx.op)

  defp control(pool, req, opts) do
    with {:ok, cfg} <- config(pool) do
      timeout = Keyword.get(opts, :timeout, cfg.timeout)

      ctx = %{
        pool: pool,
        op: Atom.to_string(elem(req, 0)),
        deadline: System.monotonic_time(:millisecond) + timeout,
        timeout: timeout
      }

      with {:ok, pid, _} <- pick(ctx, []) do
        case Worker.request(pid, req, timeout) do
          {:ok, value, _os_pid} -> {:ok, value}
          {:error, %Error{}} = err -> err
          {:error, :timeout} -> {:error, timeout_error(ctx)}
          {:error, other} -> {:error, down_error(ctx, other)}
        end
      end
    end
  end

  @doc false
  def config(pool) do
    case Registry.meta(Sidecar.Pool.registry(pool), :config) do
      {:ok, cfg} -> {:ok, cfg}
      :error -> {:error, not_running(pool)}
    end
  rescue
    ArgumentError -> {:error, not_running(pool)}
  end

  defp not_running(pool), do: Error.new(:invalid_argument, "#{inspect(pool)} is not a running sidecar pool")

  @doc false
  def idempotent_op?(pool, op) do
    case Registry.meta(Sidecar.Pool.registry(pool), :ops) do
      {:ok, ops} -> Map.get(ops, to_string(op), false)
      :error -> false
    end
  end

  # -- values --------------------------------------------------------------------------------------

  # The inputs' wire terms, and what must stay alive until the worker has answered: the mappings
  # and binaries of shared memory the descriptors point into.
  @doc false
  def encode_inputs(inputs), do: Enum.map_reduce(inputs, [], &encode/2)

  defp encode(%Tensor{storage: {:data, bin}} = t, keep) when byte_size(bin) >= @inline_limit do
    # A large binary that lies in shared memory (a zero-copy result): send its descriptor.
    case Tensor.shared(bin) do
      nil -> {Tensor.to_term(t), keep}
      shm -> {Tensor.to_term(%{t | storage: {:shm, shm}}), [bin | keep]}
    end
  end

  defp encode(%Tensor{mapping: nil} = t, keep), do: {Tensor.to_term(t), keep}
  defp encode(%Tensor{mapping: m} = t, keep), do: {Tensor.to_term(t), [m | keep]}
  defp encode(list, keep) when is_list(list), do: Enum.map_reduce(list, keep, &encode/2)
  defp encode(%_{} = struct, keep), do: {struct, keep}

  defp encode(%{} = map, keep) do
    {pairs, keep} = Enum.map_reduce(map, keep, fn {k, v}, acc -> with {v, acc} <- encode(v, acc), do: {{k, v}, acc} end)
    {Map.new(pairs), keep}
  end

  defp encode(other, keep), do: {other, keep}

  @doc false
  def wire_opts(opts, idempotent) do
    base = %{idempotent: idempotent}

    Enum.reduce(opts, base, fn
      {:placement, p}, acc -> Map.put(acc, :placement, p)
      {:out, outs}, acc -> Map.put(acc, :out, Enum.map(outs, &Tensor.to_term/1))
      {:release, ids}, acc -> Map.put(acc, :release, ids)
      {:request_id, id}, acc -> Map.put(acc, :request_id, to_string(id))
      {:inline_threshold, n}, acc -> Map.put(acc, :inline_threshold, n)
      {:alias_inputs, a}, acc -> Map.put(acc, :allow_alias, a == true)
      _, acc -> acc
    end)
  end

  # The mappings of the VM segments a call was given (inputs, `out:`), by name: an output in one
  # of them (an `out:` destination, an aliased input) is that memory, and can be viewed.
  defp own_mappings(tensors) do
    for %Tensor{storage: {:shm, %{name: name}}, mapping: m} <- List.flatten(tensors), is_reference(m),
        into: %{},
        do: {name, m}
  end

  defp result(term, worker, os_pid, read, t0, mappings) do
    leases = Map.get(term, :leases, [])
    lease = if leases == [], do: nil, else: {worker, leases}
    outputs = Enum.map(term.outputs, &decode(&1, lease, mappings))

    timing =
      Map.put(
        term.timing,
        :round_trip_ns,
        System.convert_time_unit(System.monotonic_time() - t0, :native, :nanosecond)
      )

    base = %Result{
      outputs: outputs,
      timing: timing,
      device: term[:device],
      bytes_in: term[:bytes_in],
      bytes_out: term[:bytes_out],
      request_id: term[:request_id],
      leases: leases,
      gc_leases: Map.get(term, :gc_leases, []),
      worker: worker,
      os_pid: os_pid
    }

    # A zero-copy result (the worker mapped the outputs) has nothing left to read.
    if read in [true, :copy] and leases != [], do: read_outputs(base), else: {:ok, base}
  end

  # One copy of each output out of the worker's segment (pread), then the lease goes back at once.
  defp read_outputs(%Result{} = r) do
    read = Enum.map(r.outputs, &read_value/1)
    release(r)

    case List.flatten(read) |> Enum.find(&match?({:error, _}, &1)) do
      nil -> {:ok, %{r | outputs: read, leases: []}}
      {:error, _} = err -> err
    end
  end

  @doc false
  def read_value(%Tensor{storage: {:shm, %{name: name} = shm}} = t) do
    if Tensor.own?(name) do
      # one of the VM's own segments (an `out:` destination): already ours
      %{t | lease: nil}
    else
      case Sidecar.Shm.read(name, shm.offset, shm.nbytes) do
        {:ok, bin} -> %{t | storage: {:data, bin}, lease: nil}
        {:error, _} = err -> err
      end
    end
  end

  def read_value(%Tensor{} = t), do: %{t | lease: nil}
  def read_value(list) when is_list(list), do: Enum.map(list, &read_value/1)
  def read_value(%{} = map) when not is_struct(map), do: Map.new(map, fn {k, v} -> {k, read_value(v)} end)
  def read_value(other), do: other

  @doc false
  def decode({:tensor, %{} = m}, lease, mappings) do
    t = Tensor.from_term(m, lease)

    case t.storage do
      {:shm, %{name: name}} when is_map_key(mappings, name) -> %{t | mapping: mappings[name], lease: nil}
      _ -> t
    end
  end

  def decode(list, lease, mappings) when is_list(list), do: Enum.map(list, &decode(&1, lease, mappings))
  def decode(%{} = map, lease, mappings), do: Map.new(map, fn {k, v} -> {k, decode(v, lease, mappings)} end)
  def decode(other, _lease, _mappings), do: other
end
