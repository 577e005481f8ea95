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

  Pool options (`start_link/1`, `child_spec/1`):

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
    * `:max_attempts` - tries of an idempotent call across workers when one crashes (2, which is
      also the most: a call that crashed two workers is a poison call and fails, see `call/4`).
    * `:start_timeout` - ms a worker may take to send its ready term (60 000).
    * `:restart_backoff` - `{base_ms, max_ms}` (`{100, 5000}`); `:healthy_after_ms` (5000) - a worker
      that ran this long before crashing restarts without delay.
    * `:shutdown_grace_ms` - how long a stopping worker may finish its calls (5000).
    * `:stderr` - `:capture` (default; the last `:stderr_lines` lines go into crash errors) or `:inherit`.
    * `:telemetry` - subscribe to worker events (default true); `:memory_interval_s` (5.0).
    * `:read` - default of the per-call `:read` option (true).
  """

  require Logger

  alias Sidecar.{Error, Result, Telemetry, Tensor, Worker}

  @type pool :: atom

  @doc "Starts a pool under the caller (use `child_spec/1` in a supervision tree)."
  defdelegate start_link(opts), to: Sidecar.Pool

  @doc false
  def child_spec(opts), do: Sidecar.Pool.child_spec(opts)

  @doc "Stops a pool: workers finish what runs, exit, and every segment of the pool is unlinked."
  @spec stop(pool, timeout) :: :ok
  def stop(pool, timeout \\ :infinity), do: Supervisor.stop(pool, :normal, timeout)

  @doc """
  Runs `op` on `inputs` in an idle worker of `pool`.

  Inputs are `%Sidecar.Tensor{}` values, numbers, binaries (strings), atoms, lists and maps;
  `{:bytes, bin}` passes raw bytes that are not text.

  Options:
    * `:attrs` - op parameters, a map or keyword list (`attrs: [dim: 1]`).
    * `:timeout` - ms for the whole call, retries included (pool default 30 000); on expiry the call
      is cancelled in the worker and `{:error, %Sidecar.Error{kind: :cancelled}}` returned.
    * `:idempotent` - may the call be retried on another worker after a crash? Default: what the op
      declares (`Sidecar.list_ops/1`).
    * `:max_attempts` - tries for an idempotent call (pool default 2; values above 2 change nothing).
    * `:read` - `true` (pool default): tensor outputs in worker memory are read into binaries and
      their lease released before returning; `false`: outputs stay in the worker's segments and the
      result holds their `leases` until `release/1` (use `Sidecar.Tensor.to_binary/1` meanwhile).
    * `:placement` - `:auto` (default), `:shm`, `:inline`, `:device`, `:out`.
    * `:out` - VM tensors (`Sidecar.Tensor.empty/3`) the worker writes the outputs into.
    * `:release` - lease ids to hand back, piggybacked on this call.
    * `:request_id` - a string echoed in telemetry and errors.
    * `:inline_threshold` - outputs below this many bytes come back inside the reply.

  Poison calls: every call in flight on a worker that dies counts that crash as its own (which call
  killed it cannot be known). An idempotent call is retried on another worker after its first crash;
  after a second one it fails with `%Sidecar.Error{kind: :worker_crashed}` whose `crashes` lists both
  (`%{pid:, classification:, exit_code:, signal:}`, oldest first) and whose message says it is a
  poison call: it is never sent to a third worker. Any `:worker_crashed` error of a call carries
  `crashes`.
  """
  @spec call(pool, String.t(), list, keyword) :: {:ok, Result.t()} | {:error, Error.t()}
  def call(pool, op, inputs \\ [], opts \\ []) when is_list(inputs) do
    t0 = System.monotonic_time()

    with {:ok, cfg} <- config(pool) do
      timeout = Keyword.get(opts, :timeout, cfg.timeout)
      deadline = System.monotonic_time(:millisecond) + timeout
      idempotent = Keyword.get_lazy(opts, :idempotent, fn -> idempotent_op?(pool, op) end)
      attempts = if idempotent, do: Keyword.get(opts, :max_attempts, cfg.max_attempts), else: 1

      req =
        {:call, nil, to_string(op), Enum.map(inputs, &encode/1), Map.new(Keyword.get(opts, :attrs, %{})),
         wire_opts(opts, idempotent)}

      ctx = %{pool: pool, op: to_string(op), deadline: deadline, timeout: timeout, max: attempts, cfg: cfg}

      with {:ok, term, worker, os_pid} <- attempt(ctx, req, [], []) do
        result(term, worker, os_pid, Keyword.get(opts, :read, cfg.read), t0)
      end
    end
  end

  @doc "Like `call/4`, returning the result or raising `Sidecar.Error`."
  @spec call!(pool, String.t(), list, keyword) :: Result.t()
  def call!(pool, op, inputs \\ [], opts \\ []) do
    case call(pool, op, inputs, opts) do
      {:ok, r} -> r
      {:error, e} -> raise e
    end
  end

  @doc "Hands back the leases a `read: false` result (or a leased tensor) holds."
  @spec release(Result.t() | Tensor.t()) :: :ok
  def release(%Result{leases: [], worker: _}), do: :ok
  def release(%Result{leases: ids, worker: worker}), do: Worker.release(worker, ids)
  def release(%Tensor{} = t), do: Tensor.free(t)

  @doc "Every op the workers serve: name, doc, arity, idempotency, attrs, module."
  @spec list_ops(pool, keyword) :: {:ok, [map]} | {:error, Error.t()}
  def list_ops(pool, opts \\ []), do: control(pool, {:list_ops, nil}, opts)

  @doc "What a worker sees: platform, CPU, CUDA devices, MPS, chosen device, versions, identity."
  @spec hardware(pool, keyword) :: {:ok, map} | {:error, Error.t()}
  def hardware(pool, opts \\ []), do: control(pool, {:hardware, nil}, opts)

  @doc "Per-worker status: slot, pid, os_pid, status, calls in flight, consecutive crashes, device."
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

  @doc "Waits until `count` workers (default: all) are ready; `{:error, %Sidecar.Error{}}` on timeout."
  @spec await_ready(pool, pos_integer | :all, timeout) :: :ok | {:error, Error.t()}
  def await_ready(pool, count \\ :all, timeout \\ 60_000) do
    count = if count == :all, do: config!(pool).workers, else: count
    deadline = System.monotonic_time(:millisecond) + timeout
    wait_ready(pool, count, deadline, timeout)
  end

  defp wait_ready(pool, count, deadline, timeout) do
    cond do
      length(ready_workers(pool)) >= count ->
        :ok

      System.monotonic_time(:millisecond) >= deadline ->
        {:error, Error.new(:cancelled, "#{count} workers of #{inspect(pool)} not ready within #{timeout} ms")}

      true ->
        Process.sleep(20)
        wait_ready(pool, count, deadline, timeout)
    end
  end

  # -- routing and retries -------------------------------------------------------------------------

  # A call that crashed this many workers is a poison call: failed, never sent to another worker.
  @poison_crashes 2

  # `crashes` are the worker deaths this call went through (oldest first); every counted retry
  # follows one, so their number is the number of tries so far minus one.
  defp attempt(ctx, req, crashes, avoid) do
    with {:ok, pid, counter} <- pick(ctx, avoid) do
      :counters.add(counter, 1, 1)
      res = Worker.request(pid, req, max(remaining(ctx), 1))
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

  # The worker died with this call in flight. We cannot tell which of its calls killed it, so each
  # one counts the crash as its own: retried once at most (idempotent calls), failed after two.
  defp crashed(ctx, req, crashes, avoid, pid, err) do
    crashes = crashes ++ [Map.take(err, [:pid, :classification, :exit_code, :signal])]
    tries = length(crashes)

    cond do
      tries >= @poison_crashes ->
        {:error, poison_error(ctx, err, crashes)}

      tries < ctx.max and remaining(ctx) > 0 ->
        Telemetry.execute([:sidecar, :pool, :retry], %{attempt: tries + 1}, %{
          pool: ctx.pool,
          op: ctx.op,
          reason: err.classification || :worker_crashed,
          os_pid: err.pid
        })

        # Exponential backoff with jitter, so retries of many callers do not land at once.
        base = ctx.cfg.retry_backoff_ms * Integer.pow(2, tries - 1)
        Process.sleep(min(base + :rand.uniform(max(base, 1)), max(remaining(ctx), 0)))
        attempt(ctx, req, crashes, [pid | avoid])

      true ->
        {:error, %{err | crashes: crashes}}
    end
  end

  defp poison_error(ctx, last, crashes) do
    named =
      Enum.map_join(crashes, ", ", fn c -> "pid #{c.pid || "?"} (#{c.classification || :worker_crashed})" end)

    message =
      "#{ctx.op} crashed #{length(crashes)} workers: #{named}; a poison call is not sent to another worker"

    Logger.warning("sidecar pool #{inspect(ctx.pool)}: #{message}")
    %{last | message: message, crashes: crashes}
  end

  # The idlest ready worker (fewest calls in flight), ties broken at random; waits for one to be
  # ready until the deadline.
  defp pick(ctx, avoid) do
    workers = ready_workers(ctx.pool)

    candidates =
      case Enum.reject(workers, fn {pid, _} -> pid in avoid end) do
        [] -> workers
        some -> some
      end

    cond do
      candidates != [] ->
        {pid, counter} = candidates |> Enum.shuffle() |> Enum.min_by(fn {_, c} -> :counters.get(c, 1) end)
        {:ok, pid, counter}

      remaining(ctx) <= 0 ->
        {:error,
         Error.new(:cancelled, "no worker of #{inspect(ctx.pool)} was ready within #{ctx.timeout} ms",
           op: ctx.op
         )}

      true ->
        Process.sleep(min(10, remaining(ctx)))
        pick(ctx, avoid)
    end
  end

  defp ready_workers(pool) do
    :ets.select(pool, [{{{:worker, :_}, :"$1", :_, :"$2"}, [], [{{:"$1", :"$2"}}]}])
  rescue
    ArgumentError -> []
  end

  defp remaining(ctx), do: ctx.deadline - System.monotonic_time(:millisecond)

  defp timeout_error(ctx),
    do: Error.new(:cancelled, "call to #{ctx.op} timed out after #{ctx.timeout} ms", op: ctx.op)

  defp down_error(ctx, reason),
    do:
      Error.new(:worker_crashed, "the worker process serving #{ctx.op} went down: #{inspect(reason)}",
        op: ctx.op,
        classification: :other
      )

  defp control(pool, req, opts) do
    with {:ok, cfg} <- config(pool) do
      timeout = Keyword.get(opts, :timeout, cfg.timeout)

      ctx = %{
        pool: pool,
        op: elem(req, 0),
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

  defp config(pool) do
    case :ets.lookup(pool, :config) do
      [{:config, cfg}] -> {:ok, cfg}
      [] -> {:error, Error.new(:invalid_argument, "#{inspect(pool)} is not a running sidecar pool")}
    end
  rescue
    ArgumentError -> {:error, Error.new(:invalid_argument, "#{inspect(pool)} is not a running sidecar pool")}
  end

  defp config!(pool) do
    case config(pool) do
      {:ok, cfg} -> cfg
      {:error, e} -> raise e
    end
  end

  defp idempotent_op?(pool, op) do
    case :ets.lookup(pool, {:op, to_string(op)}) do
      [{_, idempotent}] -> idempotent
      [] -> false
    end
  end

  # -- values --------------------------------------------------------------------------------------

  defp encode(%Tensor{} = t), do: Tensor.to_term(t)
  defp encode(list) when is_list(list), do: Enum.map(list, &encode/1)
  defp encode(%_{} = struct), do: struct
  defp encode(%{} = map), do: Map.new(map, fn {k, v} -> {k, encode(v)} end)
  defp encode(other), do: other

  defp wire_opts(opts, idempotent) do
    base = %{idempotent: idempotent}

    Enum.reduce(opts, base, fn
      {:placement, p}, acc -> Map.put(acc, :placement, p)
      {:out, outs}, acc -> Map.put(acc, :out, Enum.map(outs, &Tensor.to_term/1))
      {:release, ids}, acc -> Map.put(acc, :release, ids)
      {:request_id, id}, acc -> Map.put(acc, :request_id, to_string(id))
      {:inline_threshold, n}, acc -> Map.put(acc, :inline_threshold, n)
      _, acc -> acc
    end)
  end

  defp result(term, worker, os_pid, read?, t0) do
    leases = Map.get(term, :leases, [])
    lease = if leases == [], do: nil, else: {worker, leases}
    outputs = Enum.map(term.outputs, &decode(&1, lease))

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
      worker: worker,
      os_pid: os_pid
    }

    if read?, do: read_outputs(base), else: {:ok, base}
  end

  defp read_outputs(%Result{} = r) do
    read = Enum.map(r.outputs, &read_value/1)
    release(r)

    case Enum.find(read, &match?({:error, _}, &1)) do
      nil -> {:ok, %{r | outputs: read, leases: []}}
      {:error, _} = err -> err
    end
  end

  defp read_value(%Tensor{storage: {:shm, %{name: name}}} = t) do
    if String.starts_with?(name, "/sc-#{Sidecar.Shm.run_id()}-#{Sidecar.Shm.os_pid()}-") do
      # one of the VM's own segments (an `out:` destination): already ours
      %{t | lease: nil}
    else
      case Tensor.to_binary(t) do
        {:ok, bin} -> %{t | storage: {:data, bin}, lease: nil}
        {:error, _} = err -> err
      end
    end
  end

  defp read_value(%Tensor{} = t), do: %{t | lease: nil}
  defp read_value(list) when is_list(list), do: Enum.map(list, &read_value/1)
  defp read_value(other), do: other

  defp decode({:tensor, %{} = m}, lease), do: Tensor.from_term(m, lease)
  defp decode(list, lease) when is_list(list), do: Enum.map(list, &decode(&1, lease))
  defp decode(%{} = map, lease), do: Map.new(map, fn {k, v} -> {k, decode(v, lease)} end)
  defp decode(other, _lease), do: other
end
