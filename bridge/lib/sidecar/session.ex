defmodule Sidecar.Session do
  @moduledoc """
  A session: calls pinned to one worker, sharing that worker's session state (`ctx.session` in
  Python ops, e.g. a KV cache), freed when the session closes or idles past its TTL.

      {:ok, s} = Sidecar.session(pool, ttl_s: 600)
      {:ok, r1} = Sidecar.call(s, "kv_append", [tokens])
      {:ok, r2} = Sidecar.call(s, "kv_append", [more])     # same worker, same state
      :ok = Sidecar.close_session(s)

  When the session's worker dies, its state is gone: the call that was running and every later
  call of the session get `{:error, %Sidecar.Error{kind: :session_lost, session_id:, classification:}}`
  (the crash's classification). Open a new session to go on.
  """

  alias Sidecar.{Error, Pool.Manager, Worker}

  @enforce_keys [:pool, :id, :worker, :os_pid]
  defstruct [:pool, :id, :worker, :os_pid, ttl_s: 0.0]

  @type t :: %__MODULE__{pool: atom, id: String.t(), worker: pid, os_pid: non_neg_integer, ttl_s: float}

  @doc "Opens a session on the idlest ready worker of `pool`. Options: `:ttl_s`, `:timeout` (ms)."
  @spec open(atom, keyword) :: {:ok, t} | {:error, Error.t()}
  def open(pool, opts \\ []) do
    opts = Keyword.validate!(opts, ttl_s: 0.0, timeout: 30_000)
    id = Base.encode16(:rand.bytes(8), case: :lower)

    case Registry.lookup(Sidecar.Pool.registry(pool), :ready) do
      [] ->
        with :ok <- Manager.await(pool, 1, :call, opts[:timeout]), do: open(pool, opts)

      workers ->
        {pid, meta} = Enum.min_by(Enum.shuffle(workers), fn {_, w} -> :counters.get(w.counter, 1) end)
        {:ok, %__MODULE__{pool: pool, id: id, worker: pid, os_pid: meta.os_pid, ttl_s: opts[:ttl_s] / 1}}
    end
  rescue
    ArgumentError -> {:error, Error.new(:invalid_argument, "#{inspect(pool)} is not a running sidecar pool")}
  end

  @doc "Frees the session's state on its worker (if it still lives)."
  @spec close(t) :: :ok
  def close(%__MODULE__{worker: pid, id: id}) do
    if Process.alive?(pid), do: Worker.request(pid, {:close_session, nil, id}, 5_000)
    :ok
  end

  @doc false
  # The error of a call of a session whose worker is gone (`crash`: what the call itself saw).
  @spec lost(t, Error.t() | nil) :: Error.t()
  def lost(%__MODULE__{} = s, crash) do
    crash = crash || Manager.exit_of(s.pool, s.worker)

    Error.new(:session_lost,
      "session #{s.id} lost: its worker #{s.os_pid} " <>
        if(crash, do: "crashed (#{crash.classification})", else: "is gone") <>
        "; its state is gone, open a new session",
      session_id: s.id,
      pid: s.os_pid,
      classification: crash && crash.classification,
      exit_code: crash && crash.exit_code,
      signal: crash && crash.signal
    )
  end
end
