defmodule Sidecar.NativeTest do
  # The NIF: segments mapped into the VM, results that ARE the worker's memory, leases released by
  # the garbage collector, and no argument that can take the VM down.
  use ExUnit.Case
  import Bitwise
  import SidecarTest
  alias Sidecar.{Error, Native, Shm, Telemetry, Tensor}

  @kb 1024
  @mb 1024 * 1024

  setup do
    assert Native.status() == :loaded, "the NIF must be built and loaded for these tests: #{inspect(Native.status())}"
    :ok = Sidecar.await_ready(pool(), :all, 30_000)
  end

  # Large payloads repeat a random MiB (random bytes cost ~10 ms per MiB to make).
  defp payload(n) when n > @mb, do: :binary.copy(:rand.bytes(@mb), div(n, @mb))
  defp payload(n), do: :rand.bytes(n)

  defp worker_segment?(bin, os_pid) do
    case Native.locate(bin) do
      {:ok, name, _offset, _inode, false} -> String.starts_with?(name, "/sc-#{Shm.run_id()}-#{os_pid}-")
      _ -> false
    end
  end

  for size <- [@kb, 64 * @kb, @mb, 100 * @mb] do
    test "a #{div(size, @kb)} KiB round trip comes back byte-exact in a binary that is the worker's memory" do
      n = unquote(size)
      bin = payload(n)
      t = Tensor.from_binary!(bin, "uint8", [n])
      assert {:ok, %Sidecar.Result{outputs: [out], os_pid: w, leases: []}} = Sidecar.call(pool(), "identity", [t])
      assert {:data, back} = out.storage
      assert byte_size(back) == n
      same? = back == bin
      assert same?, "#{n} bytes differ after the round trip"
      # Above the inline threshold the result is a view of the worker's output segment: no copy.
      if n >= 64 * @kb, do: assert(worker_segment?(back, w))
      Tensor.free(t)
    end
  end

  @tag timeout: 180_000
  test "a 1 GiB round trip through alloc/write and a zero-copy result is byte-exact" do
    # The explicitly big one: 1 GiB in a VM segment, the worker's copy in its arena, the result a
    # view of it. About 3 GiB of memory while it runs.
    n = 1024 * @mb
    chunk = :rand.bytes(@mb)
    {:ok, t} = Tensor.alloc("uint8", [n])
    for i <- 0..1023, do: :ok = Tensor.write(t, i * @mb, chunk)
    assert {:ok, %{outputs: [out], os_pid: w}} = Sidecar.call(pool(), "identity", [t], timeout: 120_000)
    {:data, back} = out.storage
    assert byte_size(back) == n and worker_segment?(back, w)
    # Every MiB came back in place (a binary comparison of 1 GiB, without building a second one).
    assert Enum.all?(0..1023, fn i -> binary_part(back, i * @mb, @mb) == chunk end)
    Tensor.free(t)
  end

  test "a result kept after its call stays valid, and its lease is released only when it is garbage collected" do
    test = self()
    id = make_ref()
    :ok = Telemetry.attach(id, [:sidecar, :lease, :release], fn _, m, md, _ -> send(test, {:released, m, md}) end, nil)

    try do
      x = payload(4 * @mb)
      # A process holds the result; the test says when to let it go.
      holder =
        spawn_link(fn ->
          t = Tensor.from_binary!(x, "uint8", [4 * @mb])
          {:ok, %{outputs: [out], os_pid: w, gc_leases: ids}} = Sidecar.call(pool(), "identity", [t])
          send(test, {:held, w, ids})

          receive do
            {:check, from} -> send(from, {:same, out.storage == {:data, x}, worker_segment?(elem(out.storage, 1), w)})
          end

          receive do
            :drop -> :ok
          end
        end)

      assert_receive {:held, w, [_ | _] = ids}, 30_000
      # Calls of the same size that would reuse the worker's output block if the lease were gone
      # (their own results are dropped at once: the short-lived process ends).
      for _ <- 1..5 do
        Task.await(Task.async(fn -> {:ok, _} = Sidecar.call(pool(), "identity", [Tensor.from_binary!(payload(4 * @mb), "uint8", [4 * @mb])]) end), 30_000)
      end

      sync_workers(pool())
      refute_received {:released, _, %{leases: ^ids}}
      send(holder, {:check, test})
      assert_receive {:same, true, true}, 10_000
      assert Enum.any?(Sidecar.status(pool()), &(&1.os_pid == w and &1.leases_held >= 1))

      # Once the holder is gone its binary is garbage: the worker gets the lease back (released: 1).
      send(holder, :drop)
      assert_receive {:released, %{count: 1}, %{leases: ^ids, reason: :gc, os_pid: ^w}}, 10_000
    after
      Telemetry.detach(id)
    end
  end

  test "a zero-copy result passed back as an input goes as a descriptor, not as bytes" do
    bin = payload(@mb)
    t = Tensor.from_binary!(bin, "uint8", [@mb])
    {:ok, %{outputs: [out], os_pid: w}} = Sidecar.call(pool(), "identity", [t])
    {:data, back} = out.storage
    # from_binary of a binary in shared memory copies nothing: it describes that memory.
    again = Tensor.from_binary!(back, "uint8", [@mb])
    assert {:shm, %{name: name, offset: 0, nbytes: @mb}} = again.storage
    assert String.contains?(name, "-#{w}-")
    assert {:ok, %{outputs: [twice]}} = Sidecar.call(pool(), "add", [out, out])
    expected = for <<b <- bin>>, into: <<>>, do: <<band(2 * b, 255)>>
    assert Tensor.to_binary!(twice) == expected
    Tensor.free(t)
  end

  test "alias_inputs: an identity of a VM segment comes back as that segment, copied by nobody" do
    bin = payload(8 * @mb)
    {:ok, t} = Tensor.alloc("uint8", [8 * @mb])
    :ok = Tensor.write(t, 0, bin)
    assert {:ok, %{outputs: [out], leases: [], gc_leases: []}} = Sidecar.call(pool(), "identity", [t], alias_inputs: true)
    assert out.storage == t.storage
    assert {:ok, view} = Tensor.view(out)
    assert view == bin
    # The view is the segment itself: the next write shows in it.
    :ok = Tensor.write(t, 0, <<42>>)
    assert :binary.first(view) == 42
    Tensor.free(t)
  end

  test "alloc/3 gives a writable 0600 segment that write/3 fills, then serves call after call" do
    {:ok, t} = Tensor.alloc("float32", [1024])
    assert {:shm, %{name: name, nbytes: 4096}} = t.storage
    assert Bitwise.band(File.stat!(Shm.path(name)).mode, 0o777) == 0o600
    assert is_reference(t.mapping)

    for k <- 1..3 do
      :ok = Tensor.write(t, 0, floats(List.duplicate(k * 1.0, 512)))
      :ok = Tensor.write(t, 2048, floats(List.duplicate(-k * 1.0, 512)))
      {:ok, %{outputs: [s]}} = Sidecar.call(pool(), "sum", [t])
      assert to_floats(Tensor.to_binary!(s)) == [0.0]
      {:ok, %{outputs: [m]}} = Sidecar.call(pool(), "max", [t])
      assert to_floats(Tensor.to_binary!(m)) == [k * 1.0]
    end

    assert {:error, %Error{kind: :invalid_argument, field: "data"}} = Tensor.write(t, 4095, <<1, 2>>)
    assert {:error, %Error{kind: :invalid_argument}} = Tensor.write(t, -1, <<1>>)
    Tensor.free(t)
    refute File.exists?(Shm.path(name))
  end

  test "read: false outputs give zero-copy binaries that keep the lease until both are done" do
    bin = payload(2 * @mb)
    t = Tensor.from_binary!(bin, "uint8", [2 * @mb])
    {:ok, r} = Sidecar.call(pool(), "identity", [t], read: false)
    [out] = r.outputs
    assert {:ok, view} = Tensor.to_binary(out)
    assert worker_segment?(view, r.os_pid)
    # Released by the caller while the view lives: the worker keeps the lease until its GC.
    :ok = Sidecar.release(r)
    sync_workers(pool())
    assert Enum.any?(Sidecar.status(pool()), &(&1.os_pid == r.os_pid and &1.leases_held >= 1))
    assert view == bin
    Tensor.free(t)
  end

  # -- malformed NIF calls ------------------------------------------------------------------------

  # A random term: the generator for the property test (no StreamData: no hex).
  defp term(0), do: leaf()

  defp term(depth) do
    case :rand.uniform(10) do
      1 -> for _ <- 1..:rand.uniform(4), do: term(depth - 1)
      2 -> List.to_tuple(for _ <- 1..:rand.uniform(4), do: term(depth - 1))
      3 -> Map.new(for _ <- 1..:rand.uniform(3), do: {leaf(), term(depth - 1)})
      _ -> leaf()
    end
  end

  defp leaf do
    case :rand.uniform(14) do
      1 -> Enum.random([0, 1, -1, 4096, 1 <<< 32, (1 <<< 46) - 1, 1 <<< 46, (1 <<< 46) + 1, 1 <<< 64, -(1 <<< 70)])
      2 -> :rand.uniform(1 <<< 20) - (1 <<< 19)
      3 -> :rand.uniform() * 1.0e6
      4 -> Enum.random([true, false, nil, :ok, :error, :segment])
      5 -> :rand.bytes(:rand.uniform(300) - 1)
      6 -> <<"/", :rand.bytes(:rand.uniform(40))::binary>>
      7 -> self()
      8 -> make_ref()
      9 -> fn -> :ok end
      10 -> Enum.random(["", "/", "//", "/a/b", <<0>>, "/with\0nul", String.duplicate("x", 300)])
      _ -> :rand.uniform(4096) - 1
    end
  end

  # Names create/2 may be given: ours (removed afterwards), or names that create nothing: an inner
  # '/', a NUL, too long, not a binary. Never an arbitrary well-formed name: that file would be
  # created in the shared /dev/shm.
  defp create_name(prefix) do
    case :rand.uniform(5) do
      1 -> prefix <> Base.encode16(:rand.bytes(6), case: :lower)
      2 -> "/x/" <> :rand.bytes(:rand.uniform(20))
      3 -> "/sc\0" <> :rand.bytes(4)
      4 -> String.duplicate("y", 300)
      _ -> Enum.random([42, -1, 1.5, :name, nil, {"/a"}, ["/a"], %{}, self(), make_ref()])
    end
  end

  # Sizes create/2 may be given: small, or far beyond /dev/shm (refused before any page is taken).
  defp create_size do
    Enum.random([:rand.uniform(65_536) - 1, 1 <<< 40, 1 <<< 46, (1 <<< 46) + 1, -1, 1 <<< 64, term(1)])
  end

  defp reason?({atom, what}) when is_atom(atom) and is_atom(what), do: true
  defp reason?(_), do: false

  @tag timeout: 120_000
  test "thousands of malformed NIF calls return errors and the VM lives" do
    prefix = "/sc-#{Shm.run_id()}-#{System.pid()}-f"
    name = prefix <> "00base"
    {:ok, seg, _} = Native.create(name, 8192)
    {:ok, ro, 8192, _} = Native.open(name, false)
    {:ok, view} = Native.view(seg, 0, 100)
    pick = fn valid -> if :rand.uniform(3) == 1, do: valid, else: term(2) end

    calls =
      for _ <- 1..20_000 do
        case :rand.uniform(7) do
          1 -> {:create, Native.create(create_name(prefix), create_size())}
          2 -> {:open, Native.open(pick.(name), pick.(false))}
          3 -> {:view, Native.view(pick.(Enum.random([seg, ro])), pick.(10), pick.(20))}
          4 -> {:write, Native.write(pick.(Enum.random([seg, ro])), pick.(0), pick.(:rand.bytes(64)))}
          5 -> {:write, Native.write_dirty(pick.(seg), pick.(8000), pick.(:rand.bytes(300)))}
          6 -> {:locate, Native.locate(pick.(view))}
          _ -> {:lease_views, Native.lease_views(pick.(self()), term(2), pick.([{pick.(seg), pick.(0), pick.(10)}]))}
        end
      end

    for {fun, result} <- calls do
      ok? =
        case {fun, result} do
          {_, {:error, reason}} -> reason?(reason)
          {:create, {:ok, s, inode}} -> is_reference(s) and is_integer(inode)
          {:open, {:ok, s, size, inode}} -> is_reference(s) and is_integer(size) and is_integer(inode)
          {:view, {:ok, b}} -> is_binary(b)
          {:write, :ok} -> true
          {:locate, {:ok, n, off, inode, w}} -> is_binary(n) and is_integer(off) and is_integer(inode) and is_boolean(w)
          {:locate, :not_found} -> true
          {:lease_views, {:ok, bins}} -> Enum.all?(bins, &is_binary/1)
          _ -> false
        end

      assert ok?, "#{fun} returned #{inspect(result, limit: 5)}"
    end

    errors = for {_, {:error, {r, _}}} <- calls, do: r
    assert Enum.count(errors, &(&1 == :badarg)) > 5_000
    assert :enospc in errors
    # Only POSIX's portable form of a name reaches shm_open: "/" and no other "/".
    for bad <- ["x", "/a/b", "/", "/nul\0"], do: assert({:error, {:badarg, :name}} = Native.create(bad, 1))
    # Still alive, still serving; nothing of ours left behind.
    for f <- Shm.run_files(), String.starts_with?("/" <> f, prefix), do: File.rm!(Path.join("/dev/shm", f))
    a = Tensor.from_binary!(floats([1.0, 2.0]), "float32", [2])
    assert {:ok, %{outputs: [sum]}} = Sidecar.call(pool(), "add", [a, a])
    assert to_floats(Tensor.to_binary!(sum)) == [2.0, 4.0]
    flush_messages()
  end

  test "bad tensor arguments are structured errors, never exceptions from the NIF" do
    for _ <- 1..500 do
      dtype = Enum.random(["float32", "uint8", "bogus", :int64, 7])
      shape = Enum.random([[4], [0], [-1], [2, 2], :shape, [1 <<< 50]])
      data = Enum.random([:rand.bytes(16), :rand.bytes(3), <<>>])

      case Tensor.from_binary(data, dtype, shape) do
        {:ok, t} -> Tensor.free(t)
        {:error, %Error{}} -> :ok
      end

      case Tensor.alloc(dtype, Enum.random([[4], [0], [-1], [3, 3]])) do
        {:ok, t} ->
          assert match?(:ok, Tensor.write(t, 0, data)) or match?({:error, %Error{}}, Tensor.write(t, 0, data))
          Tensor.free(t)

        {:error, %Error{}} ->
          :ok
      end
    end
  end

  defp flush_messages do
    receive do
      _ -> flush_messages()
    after
      0 -> :ok
    end
  end
end
