defmodule Sidecar.Stream do
  @moduledoc """
  `Sidecar.stream/4`: the chunks of a streaming op as an Elixir `Stream`.

  Nothing runs until the stream is enumerated. The enumerating process then opens the stream on
  the idlest ready worker (`{:stream, id, op, inputs, attrs, opts}` on the port) and takes each
  `{:chunk, id, chunk}` frame as one element; the final `{:ok, id, result}` ends it.

  Flow control: the sidecar sends at most `max_chunks` chunks (and `max_bytes` bytes of them)
  that this process has not taken; a chunk is acknowledged (`{:ack, id, n}`) once it is taken, in
  batches of half a window, so a slow consumer pauses the generator instead of filling the VM's
  mailbox.

  Cancellation: leaving early (`Enum.take/2`, `Stream.take_while/2`, an exception) cancels the
  stream, and so does the enumerating process exiting (the worker process monitors it): the
  sidecar closes the generator (GeneratorExit in Python) and reclaims the leases of the chunks
  not taken. A worker that dies mid-stream ends it with `%Sidecar.Error{kind: :worker_crashed}`
  after the chunks already delivered; an idempotent stream whose worker died before its first
  chunk is started again on another worker (up to the pool's `max_attempts`).
  """
  alias Sidecar.{Error, Worker}

  @default_window 16
  @options [:attrs, :timeout, :idempotent, :request_id, :max_chunks, :max_bytes, :release]

  @doc false
  @spec new(Sidecar.pool(), String.t(), list, keyword) :: Enumerable.t()
  def new(pool, op, inputs, opts) do
    opts = Keyword.validate!(opts, @options)
    Stream.resource(fn -> open(pool, op, inputs, opts) end, &next/1, &close/1)
  end

  defp open(pool, op, inputs, opts) do
    cfg =
      case Sidecar.config(pool) do
        {:ok, cfg} -> cfg
        {:error, err} -> raise err
      end

    timeout = Keyword.get(opts, :timeout, cfg.timeout)
    idempotent = Keyword.get_lazy(opts, :idempotent, fn -> Sidecar.idempotent_op?(pool, op) end)
    {terms, keep} = Sidecar.encode_inputs(inputs)
    window = Keyword.get(opts, :max_chunks, 0)

    wire =
      opts
      |> Sidecar.wire_opts(idempotent)
      |> Map.put(:stream_max_chunks, window)
      |> Map.put(:stream_max_bytes, Keyword.get(opts, :max_bytes, 0))

    s = %{
      pool: pool,
      op: to_string(op),
      timeout: timeout,
      deadline: System.monotonic_time(:millisecond) + timeout,
      req: {:stream, nil, to_string(op), terms, Map.new(Keyword.get(opts, :attrs, %{})), wire},
      keep: keep,
      ack_every: max(1, div(if(window > 0, do: window, else: @default_window), 2)),
      attempts: if(idempotent, do: cfg.max_attempts, else: 1),
      tries: 0,
      worker: nil,
      id: nil,
      counter: nil,
      unacked: 0,
      delivered: 0,
      done: false
    }

    start(s, [])
  end

  defp start(s, avoid) do
    case Sidecar.pick(s, avoid) do
      {:ok, pid, counter} ->
        case Worker.open_stream(pid, s.req, self(), s.keep) do
          {:ok, id} ->
            :counters.add(counter, 1, 1)
            %{s | worker: pid, id: id, counter: counter, tries: s.tries + 1}

          {:error, _not_ready_or_down} ->
            start(s, [pid | avoid])
        end

      {:error, err} ->
        raise err
    end
  end

  defp next(%{done: true} = s), do: {:halt, s}

  defp next(%{id: id} = s) do
    receive do
      {:sidecar_chunk, ^id, chunk} ->
        value = chunk_value(chunk, s.worker)
        {[value], ack(%{s | delivered: s.delivered + 1, unacked: s.unacked + 1})}

      {:sidecar_stream_end, ^id, {:ok, _result}} ->
        {:halt, ended(s)}

      {:sidecar_stream_end, ^id, {:error, %Error{kind: :worker_crashed}}}
      when s.delivered == 0 and s.tries < s.attempts ->
        # Nothing of it was delivered and it may run again: another worker.
        next(start(ended(s), [s.worker]) |> Map.put(:done, false))

      {:sidecar_stream_end, ^id, {:error, %Error{} = err}} ->
        # (close/1 runs next, with this state: it counts the stream out; its cancel is a no-op)
        raise %{err | op: err.op || s.op}
    after
      max(s.deadline - System.monotonic_time(:millisecond), 0) ->
        raise Error.new(:cancelled, "stream of #{s.op} timed out after #{s.timeout} ms", op: s.op)
    end
  end

  defp ack(%{unacked: n, ack_every: every} = s) when n >= every do
    Worker.ack(s.worker, s.id, n)
    %{s | unacked: 0}
  end

  defp ack(s), do: s

  # A chunk's values, its tensors read out of the worker's segments (one copy), its lease handed back.
  defp chunk_value(%{values: values} = chunk, worker) do
    leases = Map.get(chunk, :leases, [])
    lease = if leases == [], do: nil, else: {worker, leases}
    read = Enum.map(values, &Sidecar.read_value(Sidecar.decode(&1, lease, %{})))
    if leases != [], do: Worker.release(worker, leases)

    case List.flatten(read) |> Enum.find(&match?({:error, _}, &1)) do
      {:error, %Error{} = err} ->
        raise err

      {:error, why} ->
        raise Error.new(:invalid_tensor_ref, "reading a chunk of the stream failed: #{inspect(why)}")

      nil ->
        if(length(read) == 1, do: hd(read), else: read)
    end
  end

  # The stream is over on its worker: it no longer counts there.
  defp ended(%{done: true} = s), do: s

  defp ended(s) do
    :counters.sub(s.counter, 1, 1)
    %{s | done: true}
  end

  defp close(%{done: true}), do: :ok

  defp close(%{id: id} = s) do
    Worker.cancel(s.worker, id)
    ended(s)

    # Chunks already on their way to this process are dropped (their leases are reclaimed).
    flush(id)
  end

  defp flush(id) do
    receive do
      {:sidecar_chunk, ^id, _} -> flush(id)
      {:sidecar_stream_end, ^id, _} -> flush(id)
    after
      0 -> :ok
    end
  end
end
