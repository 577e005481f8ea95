defmodule Sidecar.MetricsTest do
  # Sidecar.Metrics aggregates the bridge's telemetry events of a real pool (real workers, a real
  # segfault) into Prometheus text, served by OTP's :httpd. With SIDECAR_METRICS_TEXT_OUT set, the
  # scraped text is written there (tests/test_metrics_elixir.py parses it with prometheus-client).
  use ExUnit.Case
  import SidecarTest
  alias Sidecar.{Metrics, Tensor}

  @pool :sidecar_metrics_test_pool

  setup_all do
    start_supervised!(Metrics)

    start_supervised!(
      {Sidecar, name: @pool, workers: 1, debug_ops: true, timeout: 20_000, memory_interval_s: 0.2}
    )

    :ok = Sidecar.await_ready(@pool, :all, 60_000)
    :ok
  end

  defp line(name, labels) do
    inner = Enum.map_join(labels, ",", fn {k, v} -> ~s(#{k}="#{v}") end)
    Regex.compile!("^" <> Regex.escape("#{name}{#{inner}} ") <> "(\\S+)$", "m")
  end

  defp value(text, name, labels) do
    case Regex.run(line(name, labels), text) do
      [_, v] -> String.to_integer(v)
      nil -> nil
    end
  end

  test "a known workload gives exact counts, histograms, crash classification and memory gauges" do
    a = Tensor.from_binary!(floats([1.0, 2.0]), "float32", [2])
    b = Tensor.from_binary!(floats([1.0, 2.0, 3.0]), "float32", [3])
    for _ <- 1..3, do: {:ok, _} = Sidecar.call(@pool, "add", [a, a])
    {:error, %{kind: :shape_mismatch}} = Sidecar.call(@pool, "add", [a, b])
    {:error, %{kind: :worker_crashed, classification: :segfault}} = Sidecar.call(@pool, "debug.segfault", [])
    :ok = Sidecar.await_ready(@pool, :all, 60_000)
    {:ok, _} = Sidecar.call(@pool, "add", [a, a])

    pool = [pool: @pool]
    add = pool ++ [op: "add"]

    # Span events travel on the workers' telemetry stream, next to (not before) the replies.
    assert :ok =
             wait_until(
               fn ->
                 t = Metrics.render()
                 value(t, "sidecar_calls_total", add ++ [outcome: "ok"]) == 4 and
                   value(t, "sidecar_worker_starts_total", pool ++ [restart: true]) == 1 and
                   value(t, "sidecar_worker_rss_bytes", pool ++ [slot: 0]) != nil
               end,
               15_000
             )

    text = Metrics.render()
    assert value(text, "sidecar_calls_total", add ++ [outcome: "SHAPE_MISMATCH"]) == 1
    assert value(text, "sidecar_worker_crashes_total", pool ++ [classification: :segfault]) == 1
    assert value(text, "sidecar_worker_restarts_total", pool) == 1
    assert value(text, "sidecar_call_duration_seconds_count", add) == 5
    assert value(text, "sidecar_call_duration_seconds_bucket", add ++ [le: "+Inf"]) == 5
    assert value(text, "sidecar_call_compute_seconds_count", add) == 4
    assert value(text, "sidecar_call_bytes_total", add ++ [direction: "out"]) == 4 * 8
    assert value(text, "sidecar_worker_rss_bytes", pool ++ [slot: 0]) > 0
    assert text =~ "# TYPE sidecar_call_duration_seconds histogram\n"

    # Buckets are cumulative and end at the count.
    buckets =
      Regex.scan(~r/^sidecar_call_duration_seconds_bucket\{pool="#{@pool}",op="add",le="[^"]+"\} (\d+)$/m, text)
      |> Enum.map(fn [_, v] -> String.to_integer(v) end)

    assert length(buckets) == 19 and buckets == Enum.sort(buckets) and List.last(buckets) == 5

    # Served by :httpd on a free loopback port.
    {:ok, %{port: port, url: url, httpd: httpd}} = Metrics.serve(port: 0)
    assert port > 0 and url == "http://127.0.0.1:#{port}/metrics"
    {:ok, _} = Application.ensure_all_started(:inets)
    {:ok, {{_, 200, _}, headers, body}} = :httpc.request(:get, {String.to_charlist(url), []}, [], body_format: :binary)
    assert {'content-type', 'text/plain; version=0.0.4; charset=utf-8'} in headers
    assert value(body, "sidecar_calls_total", add ++ [outcome: "ok"]) == 4
    {:ok, {{_, 404, _}, _, _}} = :httpc.request(:get, {'http://127.0.0.1:#{port}/other', []}, [], [])
    :ok = Metrics.stop_server(httpd)

    if out = System.get_env("SIDECAR_METRICS_TEXT_OUT"), do: File.write!(out, body)
  end

  test "a non-loopback address is refused unless allowed" do
    assert {:error, {:not_loopback, {10, 1, 2, 3}, _}} = Metrics.serve(ip: {10, 1, 2, 3}, port: 0)
  end

  defmodule Recorder do
    @moduledoc false
    # Stands where :telemetry would: receives the forwarded events.
    def execute(event, measurements, metadata), do: send(:metrics_test, {:forwarded, event, measurements, metadata})
  end

  test "events can be forwarded to :telemetry (or any module with execute/3)" do
    # This project has no hex dependencies, so :telemetry itself is not here.
    unless Code.ensure_loaded?(:telemetry), do: assert({:error, :telemetry_not_loaded} = Metrics.forward_to_telemetry())
    Process.register(self(), :metrics_test)
    :ok = Metrics.forward_to_telemetry(Recorder)

    try do
      {:ok, _} = Sidecar.call(@pool, "debug.pid", [], request_id: "metrics-forward")

      assert_receive {:forwarded, [:sidecar, :call, :stop], %{duration: _},
                      %{request_id: "metrics-forward", pool: @pool}},
                     5_000
    after
      :ok = Metrics.stop_forwarding()
      Process.unregister(:metrics_test)
    end
  end
end
