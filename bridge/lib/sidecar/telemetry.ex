defmodule Sidecar.Telemetry do
  @moduledoc """
  A tiny handler registry with the API and event shape of the `:telemetry` library (no hex dependency).

  Events are `[:sidecar | rest]` lists, measurements and metadata are maps, handlers are 4-arity
  functions `fun.(event, measurements, metadata, config)`, exactly as `:telemetry` calls them, so a
  handler can forward everything to `:telemetry` where that library is present:

      Sidecar.Telemetry.attach_many("forward", Sidecar.Telemetry.events(),
        fn event, m, md, _ -> :telemetry.execute(event, m, md) end, nil)

  A handler that raises is detached (and logged), like `:telemetry` does, so a bad handler cannot
  break calls.

  Events:

    * `[:sidecar, :call, :start]` - `%{system_time: ns, bytes_in}`; metadata `op, request_id, os_pid`
    * `[:sidecar, :call, :stop]` - `%{duration: native, bytes_in, bytes_out, queue_ns, decode_ns,
      compute_ns, encode_ns, total_ns}`; metadata `op, request_id, os_pid`
    * `[:sidecar, :call, :exception]` - `%{duration: native, ...}`; metadata adds `kind, message`
    * `[:sidecar, :memory]` - `%{rss_bytes, arena_reserved_bytes, arena_in_use_bytes, leases}`
    * `[:sidecar, :worker, :ready]` - `%{startup: native}` (spawn to ready) and, for a replacement,
      `since_exit: native` (the previous worker of the slot exited to this one ready); metadata
      `slot, os_pid, device, via` (`:fork` from the template, `:cold`), `restart`
    * `[:sidecar, :pool, :crash]` - `%{count: 1}`; metadata `slot, os_pid, classification, exit_code,
      signal, stderr_tail, caused` (can the work have caused it, `Sidecar.Exit.caused_by_work?/1`),
      `phase` (`:start` before the ready term, `:running`)
    * `[:sidecar, :pool, :restart]` - `%{delay_ms}`; metadata `slot, consecutive_crashes, held` (true:
      the open breaker holds the start until its probe or its close)
    * `[:sidecar, :pool, :retry]` - `%{attempt}`; metadata `op, reason`
    * `[:sidecar, :pool, :breaker]` - `%{crashes}` (within the window); metadata `state` (`:open`,
      `:half_open`, `:closed`) and, when it opens, the `classification` of the last crash
    * `[:sidecar, :lease, :release]` - `%{count}` (leases the worker released); metadata `leases`,
      `reason` (`:gc`: the binaries that showed them were collected; `:explicit`: `Sidecar.release/1`;
      `:abandoned`: a call the caller gave up on; `:unused`)

  Worker events carry `pool` and `slot` in their metadata too.
  """
  use GenServer
  require Logger

  @table __MODULE__

  @type event :: [atom, ...]
  @type handler :: (event, map, map, term -> any)

  @doc "Every event name the bridge emits."
  @spec events() :: [event]
  def events do
    [
      [:sidecar, :call, :start],
      [:sidecar, :call, :stop],
      [:sidecar, :call, :exception],
      [:sidecar, :memory],
      [:sidecar, :worker, :ready],
      [:sidecar, :pool, :crash],
      [:sidecar, :pool, :restart],
      [:sidecar, :pool, :retry],
      [:sidecar, :pool, :breaker],
      [:sidecar, :lease, :release]
    ]
  end

  @doc false
  @spec start_link(term) :: GenServer.on_start()
  def start_link(_opts), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  @impl true
  def init([]) do
    :ets.new(@table, [:bag, :public, :named_table, read_concurrency: true])
    {:ok, nil}
  end

  @doc "Attaches `fun` to one event under `id`; `{:error, :already_exists}` if the id is taken."
  @spec attach(term, event, handler, term) :: :ok | {:error, :already_exists}
  def attach(id, event, fun, config), do: attach_many(id, [event], fun, config)

  @doc "Attaches `fun` to several events under one `id`."
  @spec attach_many(term, [event], handler, term) :: :ok | {:error, :already_exists}
  def attach_many(id, events, fun, config) when is_function(fun, 4) and is_list(events) do
    GenServer.call(__MODULE__, {:attach, id, events, fun, config})
  end

  @doc "Removes every attachment of `id`."
  @spec detach(term) :: :ok | {:error, :not_found}
  def detach(id), do: GenServer.call(__MODULE__, {:detach, id})

  @doc "Handlers whose event starts with `prefix`, as `%{id:, event_name:, function:, config:}` maps."
  @spec list_handlers(list) :: [map]
  def list_handlers(prefix) do
    for {event, id, fun, config} <- :ets.tab2list(@table), List.starts_with?(event, prefix) do
      %{id: id, event_name: event, function: fun, config: config}
    end
  end

  @doc "Calls every handler of `event` in the calling process."
  @spec execute(event, map, map) :: :ok
  def execute(event, measurements, metadata) do
    for {_, id, fun, config} <- lookup(event) do
      try do
        fun.(event, measurements, metadata, config)
      rescue
        e ->
          Logger.error("telemetry handler #{inspect(id)} raised and was detached: #{Exception.message(e)}")
          detach(id)
      catch
        kind, reason ->
          Logger.error("telemetry handler #{inspect(id)} failed (#{kind}: #{inspect(reason)}); detached")
          detach(id)
      end
    end

    :ok
  end

  defp lookup(event) do
    :ets.lookup(@table, event)
  rescue
    ArgumentError -> []
  end

  @impl true
  def handle_call({:attach, id, events, fun, config}, _from, state) do
    if :ets.match(@table, {:_, id, :_, :_}) != [] do
      {:reply, {:error, :already_exists}, state}
    else
      for e <- events, do: :ets.insert(@table, {e, id, fun, config})
      {:reply, :ok, state}
    end
  end

  def handle_call({:detach, id}, _from, state) do
    found = :ets.match(@table, {:_, id, :_, :_}) != []
    :ets.match_delete(@table, {:_, id, :_, :_})
    {:reply, if(found, do: :ok, else: {:error, :not_found}), state}
  end
end
