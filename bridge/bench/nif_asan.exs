# The NIF under AddressSanitizer (run by bench/nif_asan.sh, which builds it with -fsanitize=address
# and preloads libasan into the VM): every function with valid and malformed arguments, views and
# leases collected by the GC, real round trips through a worker (leases mapped in the worker
# process, zero-copy inputs); then no mapping of ours may be left once everything is collected.
import Bitwise
alias Sidecar.{Native, Shm, Tensor}
IO.puts("NATIVE #{inspect(Native.status())}")
prefix = "/sc-#{Shm.run_id()}-#{System.pid()}-a"
junk = fn -> Enum.random([-1, 1 <<< 64, "x", :a, {1}, [1], self(), make_ref(), 1.5, <<0>>, "/a/b"]) end
{:ok, seg, _} = Native.create(prefix <> "00base", 65_536)
{:ok, ro, 65_536, _} = Native.open(prefix <> "00base", false)
counts =
  for i <- 1..50_000, reduce: %{} do
    acc ->
      r =
        case rem(i, 9) do
          0 -> Native.create(Enum.random([prefix <> Base.encode16(:rand.bytes(5), case: :lower), "/x/y", junk.()]), Enum.random([:rand.uniform(100_000), 1 <<< 40, junk.()]))
          1 -> Native.open(Enum.random([prefix <> "00base", "/nope-#{i}", junk.()]), Enum.random([true, false, junk.()]))
          2 -> Native.view(Enum.random([seg, ro, junk.()]), Enum.random([0, 65_535, 65_536, 70_000, junk.()]), Enum.random([0, 1, 65_536, junk.()]))
          3 -> Native.write(Enum.random([seg, ro, junk.()]), Enum.random([0, 65_000, 65_536, junk.()]), Enum.random([:rand.bytes(600), <<>>, junk.()]))
          4 -> Native.write_dirty(seg, :rand.uniform(60_000), :rand.bytes(:rand.uniform(5_000)))
          5 -> with {:ok, v} <- Native.view(seg, :rand.uniform(1000), 4000), do: Native.locate(binary_part(v, 10, 3000))
          6 -> Native.lease_views(Enum.random([self(), junk.()]), {:gc, i}, Enum.random([[{seg, 0, 10}, {ro, 100, 5000}], [{seg, 0, 70_000}], [], junk.()]))
          7 -> Native.locate(Enum.random([:rand.bytes(100), junk.()]))
          _ -> with {:ok, [a, b]} <- Native.lease_views(self(), {:gc, i}, [{seg, 0, 100}, {ro, 0, 100}]), do: {:ok, byte_size(a) + byte_size(b)}
        end
      key = case r do {:ok, _} -> :ok; {:ok, _, _} -> :ok; {:ok, _, _, _} -> :ok; {:ok, _, _, _, _} -> :ok; :ok -> :ok; :not_found -> :not_found; {:error, {e, _}} -> e end
      if rem(i, 5000) == 0, do: :erlang.garbage_collect()
      Map.update(acc, key, 1, &(&1 + 1))
  end
IO.inspect(counts, label: "results")
seg = nil
ro = nil
_ = {seg, ro}
:erlang.garbage_collect()
gcs = Stream.repeatedly(fn -> receive do {:gc, _} -> 1 after 200 -> nil end end) |> Enum.take_while(& &1) |> length()
IO.puts("lease messages after GC: #{gcs}")
for f <- Shm.run_files(), String.starts_with?("/" <> f, prefix), do: File.rm!(Path.join("/dev/shm", f))
mapped = fn -> File.read!("/proc/#{System.pid()}/maps") |> String.split("\n") |> Enum.count(&String.contains?(&1, "/dev/shm/sc-#{Shm.run_id()}-")) end
IO.puts("mappings of this run left after the churn: #{mapped.()}")
{:ok, _} = Sidecar.start_link(name: :asan_pool, workers: 1, env: [{"LD_PRELOAD", nil}])
:ok = Sidecar.await_ready(:asan_pool, :all, 120_000)
for n <- [1_000, 70_000, 4_000_000, 100_000_000] do
  bin = :binary.copy(:rand.bytes(1000), div(n, 1000))
  t = Tensor.from_binary!(bin, "uint8", [n])
  {:ok, %{outputs: [o]}} = Sidecar.call(:asan_pool, "identity", [t])
  {:ok, %{outputs: [o2]}} = Sidecar.call(:asan_pool, "identity", [Tensor.from_binary!(elem(o.storage, 1), "uint8", [n])])
  IO.puts("round trip #{n}: #{elem(o.storage, 1) == bin and elem(o2.storage, 1) == bin}")
  Tensor.free(t)
end
:erlang.garbage_collect()
Sidecar.stop(:asan_pool)
for p <- Process.list(), do: :erlang.garbage_collect(p)
Process.sleep(200)
left = mapped.()
IO.puts("mappings of this run left after the round trips: #{left}")
if left != 0, do: System.halt(1)
IO.puts("ASAN RUN DONE")
