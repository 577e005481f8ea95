defmodule Sidecar.Metrics do
  @moduledoc """
  Prometheus metrics of the bridge, aggregated from its telemetry events (`Sidecar.Telemetry`),
  rendered in the Prometheus text format and servable with OTP's own `:httpd` (no hex package).

      children = [{Sidecar, name: MyApp.Sidecar, workers: 2}, Sidecar.Metrics]
      {:ok, %{port: port}} = Sidecar.Metrics.serve(port: 9464)
      # curl http://127.0.0.1:9464/metrics

  The names are those of the Python host's exporter (`guides/observability.md`), with a `pool`
  label (the pool's name):

    * `sidecar_calls_total{pool, op, outcome}` - calls by outcome: `ok` or the error kind
      (`SHAPE_MISMATCH`, ... as in the proto)
    * `sidecar_call_duration_seconds{pool, op}` - histogram of the worker's time per call (decode,
      queue, compute, encode); `sidecar_call_queue_seconds`, `sidecar_call_compute_seconds` - its
      parts, for calls that succeeded
    * `sidecar_call_bytes_total{pool, op, direction}` - tensor bytes of calls that succeeded
    * `sidecar_worker_crashes_total{pool, classification}`, `sidecar_worker_restarts_total{pool}`,
      `sidecar_worker_starts_total{pool, restart}`, `sidecar_call_retries_total{pool, op}`
    * `sidecar_worker_rss_bytes`, `sidecar_worker_arena_reserved_bytes`,
      `sidecar_worker_arena_in_use_bytes`, `sidecar_worker_leases` - gauges `{pool, slot}` from the
      workers' memory samples (every `:memory_interval_s` of the pool)

  Counters are kept in a public ETS table and updated by the handler in the process that emits the
  event (`:ets.update_counter/4`: no message to a server per call). This process owns the table and
  the handler; stop it and both are gone.

  ## Forwarding to `:telemetry` / `Telemetry.Metrics`

  In an application that has `:telemetry` (and `telemetry_metrics` with a reporter), forward the
  bridge's events and define metrics on them as usual:

      Sidecar.Metrics.forward_to_telemetry()

      # in the app's telemetry supervisor
      [
        Telemetry.Metrics.counter("sidecar.call.stop.duration", tags: [:pool, :op]),
        Telemetry.Metrics.distribution("sidecar.call.stop.duration", unit: {:native, :second},
          tags: [:pool, :op]),
        Telemetry.Metrics.counter("sidecar.call.exception.duration", tags: [:pool, :op, :kind]),
        Telemetry.Metrics.counter("sidecar.pool.crash.count", tags: [:pool, :classification]),
        Telemetry.Metrics.last_value("sidecar.memory.rss_bytes", tags: [:pool, :slot])
      ]
  """
  use GenServer

  alias Sidecar.Telemetry

  @table __MODULE__
  @handler_id {__MODULE__, :aggregate}
  @forward_id {__MODULE__, :forward}

  # Seconds; the same buckets as the Python exporter (sidecar/observe/metrics.py), and `le` labels
  # spelled as it spells them, so that series of both hosts aggregate by `le`.
  @buckets [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            5.0, 10.0, 30.0, 60.0]
  @bucket_labels ~w(0.0001 0.00025 0.0005 0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25 0.5 1.0 2.5 5.0
                    10.0 30.0 60.0 +Inf)

  @help %{
    "sidecar_calls_total" => {"counter", "Calls by op and outcome (ok, or the error kind)"},
    "sidecar_call_duration_seconds" =>
      {"histogram", "Time a call spent inside the worker (decode, queue, compute, encode)"},
    "sidecar_call_queue_seconds" =>
      {"histogram", "Time a call waited in the worker for a free concurrency slot"},
    "sidecar_call_compute_seconds" => {"histogram", "Time the op itself ran in the worker"},
    "sidecar_call_bytes_total" => {"counter", "Tensor bytes of calls that succeeded, by direction"},
    "sidecar_worker_crashes_total" => {"counter", "Unexpected worker exits, by classification"},
    "sidecar_worker_restarts_total" => {"counter", "Replacement workers started after a crash"},
    "sidecar_worker_starts_total" => {"counter", "Workers that became ready (restart: a replacement)"},
    "sidecar_call_retries_total" => {"counter", "Idempotent calls sent again after their worker crashed"},
    "sidecar_worker_rss_bytes" => {"gauge", "Resident memory of a worker process"},
    "sidecar_worker_arena_reserved_bytes" => {"gauge", "Shared memory a worker's arena holds"},
    "sidecar_worker_arena_in_use_bytes" => {"gauge", "A worker's arena memory holding outputs"},
    "sidecar_worker_leases" => {"gauge", "Output leases a worker holds for the host (not yet released)"}
  }

  @memory_gauges [
    rss_bytes: "sidecar_worker_rss_bytes",
    arena_reserved_bytes: "sidecar_worker_arena_reserved_bytes",
    arena_in_use_bytes: "sidecar_worker_arena_in_use_bytes",
    leases: "sidecar_worker_leases"
  ]

  # -- process ---------------------------------------------------------------------------------------

  @doc "Starts the aggregator (one per VM): creates the table and attaches the handler."
  def start_link(opts \\ []), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @impl true
  def init(_opts) do
    # Trap exits so that terminate/2 runs on shutdown and detaches the handler with the table.
    Process.flag(:trap_exit, true)
    :ets.new(@table, [:set, :public, :named_table, write_concurrency: true, read_concurrency: true])
    :ok = Telemetry.attach_many(@handler_id, Telemetry.events(), &__MODULE__.handle_event/4, nil)
    {:ok, %{servers: []}}
  end

  @impl true
  def terminate(_reason, state) do
    Telemetry.detach(@handler_id)
    Enum.each(state.servers, &:inets.stop(:httpd, &1))
    :ok
  end

  @doc "Forgets every figure (counters start again from zero)."
  @spec reset() :: :ok
  def reset do
    :ets.delete_all_objects(@table)
    :ok
  end

  # -- aggregation -----------------------------------------------------------------------------------

  @doc false
  def handle_event([:sidecar, :call, :stop], m, md, _) do
    labels = [pool: md[:pool], op: md[:op]]
    count("sidecar_calls_total", labels ++ [outcome: "ok"], 1)
    observe("sidecar_call_duration_seconds", labels, duration_ns(m))
    observe("sidecar_call_queue_seconds", labels, Map.get(m, :queue_ns, 0))
    observe("sidecar_call_compute_seconds", labels, Map.get(m, :compute_ns, 0))
    count("sidecar_call_bytes_total", labels ++ [direction: "in"], Map.get(m, :bytes_in, 0))
    count("sidecar_call_bytes_total", labels ++ [direction: "out"], Map.get(m, :bytes_out, 0))
  end

  def handle_event([:sidecar, :call, :exception], m, md, _) do
    labels = [pool: md[:pool], op: md[:op]]
    count("sidecar_calls_total", labels ++ [outcome: outcome(md[:kind])], 1)
    observe("sidecar_call_duration_seconds", labels, duration_ns(m))
  end

  def handle_event([:sidecar, :pool, :crash], _m, md, _),
    do: count("sidecar_worker_crashes_total", [pool: md[:pool], classification: md[:classification]], 1)

  def handle_event([:sidecar, :pool, :restart], _m, md, _),
    do: count("sidecar_worker_restarts_total", [pool: md[:pool]], 1)

  def handle_event([:sidecar, :pool, :retry], _m, md, _),
    do: count("sidecar_call_retries_total", [pool: md[:pool], op: md[:op]], 1)

  def handle_event([:sidecar, :worker, :ready], _m, md, _),
    do: count("sidecar_worker_starts_total", [pool: md[:pool], restart: md[:restart] == true], 1)

  def handle_event([:sidecar, :memory], m, md, _) do
    labels = [pool: md[:pool], slot: md[:slot]]
    for {key, name} <- @memory_gauges, is_number(m[key]), do: :ets.insert(@table, {{:gauge, name, labels}, m[key]})
    :ok
  end

  def handle_event(_event, _m, _md, _), do: :ok

  defp duration_ns(%{duration: d}), do: System.convert_time_unit(d, :native, :nanosecond)
  defp duration_ns(_), do: 0

  defp outcome(nil), do: "OP_FAILED"
  defp outcome(kind), do: kind |> to_string() |> String.upcase()

  defp count(_name, _labels, 0), do: :ok

  defp count(name, labels, n) do
    :ets.update_counter(@table, {:counter, name, labels}, n, {{:counter, name, labels}, 0})
    :ok
  end

  # A histogram is one counter per bucket (not cumulative: summed when rendered), a count and a sum
  # of integer nanoseconds, so that every update is an atomic update_counter.
  defp observe(name, labels, ns) when is_integer(ns) and ns >= 0 do
    s = ns / 1.0e9
    i = Enum.find_index(@buckets, &(s <= &1)) || length(@buckets)
    key = {:hist, name, labels}
    :ets.update_counter(@table, key, [{2, 1}, {3, ns}, {4 + i, 1}], List.to_tuple([key, 0, 0 | zeros()]))
    :ok
  end

  defp observe(_, _, _), do: :ok

  defp zeros, do: List.duplicate(0, length(@buckets) + 1)

  # -- rendering -------------------------------------------------------------------------------------

  @doc "Every figure in the Prometheus text exposition format (version 0.0.4)."
  @spec render() :: binary
  def render do
    rows = :ets.tab2list(@table)

    rows
    |> Enum.group_by(fn row -> row |> elem(0) |> elem(1) end)
    |> Enum.sort_by(fn {name, _} -> name end)
    |> Enum.map(fn {name, entries} -> family(name, Enum.sort(entries)) end)
    |> IO.iodata_to_binary()
  end

  defp family(name, entries) do
    {type, help} = Map.get(@help, name, {"untyped", name})
    head = ["# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n"]
    [head | Enum.map(entries, &sample(name, &1))]
  end

  defp sample(name, {{:counter, _, labels}, v}), do: [name, labels(labels), " ", number(v), "\n"]
  defp sample(name, {{:gauge, _, labels}, v}), do: [name, labels(labels), " ", number(v), "\n"]

  defp sample(name, row) do
    [{:hist, _, labels}, count, sum_ns | buckets] = Tuple.to_list(row)
    {lines, _} =
      Enum.zip(@bucket_labels, buckets)
      |> Enum.map_reduce(0, fn {le, n}, acc ->
        {[name, "_bucket", labels(labels ++ [le: le]), " ", number(acc + n), "\n"], acc + n}
      end)

    [lines, name, "_sum", labels(labels), " ", number(sum_ns / 1.0e9), "\n", name, "_count", labels(labels), " ",
     number(count), "\n"]
  end

  defp labels([]), do: ""

  defp labels(kv) do
    inner = kv |> Enum.map(fn {k, v} -> [Atom.to_string(k), "=\"", escape(v), "\""] end) |> Enum.intersperse(",")
    ["{", inner, "}"]
  end

  defp escape(v) do
    (if is_binary(v), do: v, else: to_string(inspect_label(v)))
    |> String.replace("\\", "\\\\")
    |> String.replace("\"", "\\\"")
    |> String.replace("\n", "\\n")
  end

  defp inspect_label(v) when is_atom(v) or is_number(v), do: v
  defp inspect_label(nil), do: ""
  defp inspect_label(v), do: inspect(v)

  defp number(v) when is_integer(v), do: Integer.to_string(v)
  defp number(v) when is_float(v), do: :erlang.float_to_binary(v, [:short])

  # -- serving ---------------------------------------------------------------------------------------

  @doc """
  Serves `render/0` at `http://IP:PORT/metrics` with OTP's `:httpd` (inets), until
  `stop_server/1` or until this process stops (`start_link/1` it first, e.g. in the supervision tree).

  Options: `:port` (default 9464; 0 picks a free one), `:ip` (default `{127, 0, 0, 1}`), and
  `:allow_remote` (default false): a non-loopback `:ip` is refused without it, since the figures
  name ops and pools. Returns `{:ok, %{port: port, url: url, httpd: pid}}`.
  """
  @spec serve(keyword) :: {:ok, map} | {:error, term}
  def serve(opts \\ []), do: GenServer.call(__MODULE__, {:serve, opts})

  @doc "Stops a server started by `serve/1`."
  @spec stop_server(pid) :: :ok | {:error, term}
  def stop_server(httpd), do: GenServer.call(__MODULE__, {:stop_server, httpd})

  @impl true
  def handle_call({:serve, opts}, _from, state) do
    ip = Keyword.get(opts, :ip, {127, 0, 0, 1})
    port = Keyword.get(opts, :port, 9464)

    cond do
      not loopback?(ip) and not Keyword.get(opts, :allow_remote, false) ->
        {:reply, {:error, {:not_loopback, ip, "pass allow_remote: true to expose the metrics"}}, state}

      true ->
        {:ok, _} = Application.ensure_all_started(:inets)
        root = Path.join(System.tmp_dir!(), "sidecar-metrics-httpd")
        File.mkdir_p!(root)

        config = [
          port: port,
          bind_address: ip,
          ipfamily: if(tuple_size(ip) == 8, do: :inet6, else: :inet),
          server_name: 'sidecar_metrics',
          server_root: String.to_charlist(root),
          document_root: String.to_charlist(root),
          modules: [Sidecar.Metrics.Httpd]
        ]

        # Under inets' own supervisor; this process stops it in stop_server/1 or terminate/2.
        case :inets.start(:httpd, config) do
          {:ok, pid} ->
            bound = Keyword.fetch!(:httpd.info(pid), :port)
            url = "http://#{:inet.ntoa(ip)}:#{bound}/metrics"
            {:reply, {:ok, %{port: bound, url: url, httpd: pid}}, %{state | servers: [pid | state.servers]}}

          {:error, reason} ->
            {:reply, {:error, reason}, state}
        end
    end
  end

  def handle_call({:stop_server, pid}, _from, state) do
    if pid in state.servers do
      {:reply, :inets.stop(:httpd, pid), %{state | servers: List.delete(state.servers, pid)}}
    else
      {:reply, {:error, :not_found}, state}
    end
  end

  defp loopback?({127, _, _, _}), do: true
  defp loopback?({0, 0, 0, 0, 0, 0, 0, 1}), do: true
  defp loopback?(_), do: false

  # -- forwarding ------------------------------------------------------------------------------------

  @doc """
  Re-emits every bridge event through `:telemetry.execute/3` (or `module.execute/3`), so that
  `Telemetry.Metrics` reporters see them. `{:error, :telemetry_not_loaded}` when the application
  has no `:telemetry`; `stop_forwarding/0` undoes it.
  """
  @spec forward_to_telemetry(module) :: :ok | {:error, term}
  def forward_to_telemetry(module \\ :telemetry) do
    if Code.ensure_loaded?(module) and function_exported?(module, :execute, 3) do
      Telemetry.attach_many(@forward_id, Telemetry.events(), &__MODULE__.forward/4, module)
    else
      {:error, :telemetry_not_loaded}
    end
  end

  @doc "Detaches the forwarder of `forward_to_telemetry/1`."
  @spec stop_forwarding() :: :ok | {:error, :not_found}
  def stop_forwarding, do: Telemetry.detach(@forward_id)

  @doc false
  def forward(event, measurements, metadata, module), do: module.execute(event, measurements, metadata)
end

defmodule Sidecar.Metrics.Httpd do
  @moduledoc false
  # An :httpd module: GET /metrics answers Sidecar.Metrics.render/0; anything else is 404.
  require Record
  Record.defrecord(:mod, Record.extract(:mod, from_lib: "inets/include/httpd.hrl"))

  def unquote(:do)(data) do
    path = data |> mod(:request_uri) |> to_string() |> String.split("?") |> hd()
    method = data |> mod(:method) |> to_string()

    {code, type, body} =
      cond do
        method not in ["GET", "HEAD"] -> {405, 'text/plain', "only GET\n"}
        path == "/metrics" -> {200, 'text/plain; version=0.0.4; charset=utf-8', Sidecar.Metrics.render()}
        true -> {404, 'text/plain', "not found: try /metrics\n"}
      end

    head = [code: code, content_type: type, content_length: Integer.to_charlist(byte_size(body))]
    {:proceed, [{:response, {:response, head, if(method == "HEAD", do: [], else: [body])}}]}
  end
end
