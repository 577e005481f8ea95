# Sidecar.stream/4 against a call per chunk, from a real VM (benchmarks/bench_stream.py runs this).
# Run from bridge/: mix run bench/stream.exs --chunks N
# Prints one JSON line: {"rows": [{"case", "size", "chunks", "first_chunk_ms", "chunks_per_s"}, ...]}
{opts, _, _} = OptionParser.parse(System.argv(), strict: [chunks: :integer, repeat: :integer])
n = opts[:chunks] || 2000
repeat = opts[:repeat] || 30
ops = Path.expand("../tests/stream_ops_module.py", File.cwd!())
{:ok, _} = Sidecar.start_link(name: :bench_stream, workers: 1, ops: [ops], timeout: 120_000)
:ok = Sidecar.await_ready(:bench_stream, :all, 120_000)

ms = fn t0 -> (System.monotonic_time() - t0) / System.convert_time_unit(1, :millisecond, :native) end
median = fn xs -> Enum.at(Enum.sort(xs), div(length(xs), 2)) end

rows =
  for {size, nbytes} <- [{"small", 0}, {"1MiB", 1_048_576}] do
    count = if nbytes == 0, do: n, else: max(50, div(n, 10))
    attrs = if nbytes == 0, do: [], else: [nbytes: nbytes]

    first =
      median.(
        for _ <- 1..repeat do
          t0 = System.monotonic_time()
          [_] = Sidecar.stream(:bench_stream, "count_up", [], attrs: [n: 1] ++ attrs) |> Enum.take(1)
          ms.(t0)
        end
      )

    t0 = System.monotonic_time()
    ^count = Sidecar.stream(:bench_stream, "count_up", [], attrs: [n: count] ++ attrs) |> Enum.count()
    stream_rate = count / (ms.(t0) / 1000)

    unary_first =
      median.(
        for i <- 1..repeat do
          t0 = System.monotonic_time()
          {:ok, _} = Sidecar.call(:bench_stream, "chunk_at", [], attrs: [i: i] ++ attrs, read: :copy)
          ms.(t0)
        end
      )

    t0 = System.monotonic_time()
    for i <- 1..count, do: {:ok, _} = Sidecar.call(:bench_stream, "chunk_at", [], attrs: [i: i] ++ attrs, read: :copy)
    unary_rate = count / (ms.(t0) / 1000)

    [
      ~s({"case": "elixir/stream", "size": "#{size}", "chunks": #{count}, "first_chunk_ms": #{Float.round(first, 3)}, "chunks_per_s": #{Float.round(stream_rate, 1)}}),
      ~s({"case": "elixir/unary-per-chunk", "size": "#{size}", "chunks": #{count}, "first_chunk_ms": #{Float.round(unary_first, 3)}, "chunks_per_s": #{Float.round(unary_rate, 1)}})
    ]
  end

Sidecar.stop(:bench_stream)
IO.puts(~s({"rows": [) <> Enum.join(List.flatten(rows), ", ") <> "]}")
