# A tour of the bridge: run from bridge/ with `mix run examples/quickstart.exs`
# (SIDECAR_PYTHON names the interpreter that has the sidecar package; default ../.venv/bin/python).
alias Sidecar.{Error, Tensor}

python = System.get_env("SIDECAR_PYTHON") || Path.expand("../.venv/bin/python", File.cwd!())

# 1. A pool of two workers (debug ops on, so we can crash one on purpose below).
{:ok, _sup} = Sidecar.start_link(name: :demo, workers: 2, python: python, debug_ops: true)
:ok = Sidecar.await_ready(:demo)
{:ok, hw} = Sidecar.hardware(:demo)
IO.puts("workers ready on #{hw.device}: #{hw.cpu.model}, #{hw.cpu.threads} threads, torch #{hw.torch_version}")

# 2. Telemetry: print every finished call.
Sidecar.Telemetry.attach("print-calls", [:sidecar, :call, :stop], fn _event, m, md, _config ->
  IO.puts("  [telemetry] #{md.op} on worker #{md.os_pid}: " <>
            "#{System.convert_time_unit(m.duration, :native, :microsecond)} us, #{m.bytes_in} bytes in")
end, nil)

# 3. A 4 MB tensor through shared memory: the port carries only its descriptor.
floats = for i <- 1..1_000_000, into: <<>>, do: <<i * 0.5::float-32-native>>
a = Tensor.from_binary!(floats, "float32", [1000, 1000])
IO.inspect(a, label: "input")
{:ok, result} = Sidecar.call(:demo, "add", [a, a])
[sum] = result.outputs
# With the NIF the result's bytes are the worker's memory: a binary made without a copy, whose
# lease goes back to the worker when it is garbage collected.
IO.inspect(sum, label: "result")
<<first::float-32-native, second::float-32-native, _::binary>> = Tensor.to_binary!(sum)
IO.puts("add: #{inspect(sum.shape)} #{sum.dtype}, first elements #{first}, #{second}; " <>
          "worker compute #{div(result.timing.compute_ns, 1000)} us, round trip #{div(result.timing.round_trip_ns, 1000)} us")
{:ok, %{outputs: [m]}} = Sidecar.call(:demo, "mean", [a], attrs: [dim: 1])
IO.puts("mean over dim 1: #{inspect(m.shape)}")

# 4. A structured error, matched by kind.
b = Tensor.from_binary!(:binary.copy(<<0::float-32-native>>, 6), "float32", [3, 2])
c = Tensor.from_binary!(:binary.copy(<<0::float-32-native>>, 6), "float32", [2, 3])

case Sidecar.call(:demo, "matmul", [b, b]) do
  {:error, %Error{kind: :shape_mismatch} = e} ->
    IO.puts("shape_mismatch: #{e.message}\n  shapes #{inspect(e.input_shapes)}, suggestion: #{e.suggestion}")
end

{:ok, %{outputs: [bc]}} = Sidecar.call(:demo, "matmul", [b, c])
IO.puts("matmul [3, 2] x [2, 3] -> #{inspect(bc.shape)}")

# 5. A worker segfaults: the call gets a classified crash, the pool replaces the worker (a fork of
# its template, which imported torch once: tens of milliseconds).
{:error, %Error{kind: :worker_crashed} = crash} = Sidecar.call(:demo, "debug.segfault", [])
IO.puts("crash: #{crash.message} (classification #{inspect(crash.classification)}, signal #{crash.signal})")
:ok = Sidecar.await_ready(:demo)
IO.puts("pool back to full strength:")
for w <- Sidecar.status(:demo),
    do: IO.puts("  slot #{w.slot}: os pid #{w.os_pid}, #{w.status} (#{w.via}), #{w.consecutive_crashes} crash(es)")

# 6. Shut down: workers exit, every segment of the pool and of this VM is unlinked.
Tensor.free(a)
:ok = Sidecar.stop(:demo)
IO.puts("after stop, segments of this run in /dev/shm: #{length(Sidecar.Shm.run_files())}")
