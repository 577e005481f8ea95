defmodule Sidecar.TensorTest do
  # Tensors cross the port as descriptors of shared memory; bytes must come back exactly.
  use ExUnit.Case
  import SidecarTest
  alias Sidecar.{Error, Tensor}

  @kb 1024
  @mb 1024 * 1024

  # bool needs 0/1 bytes; every other dtype takes arbitrary bit patterns (NaN payloads included).
  # Large payloads repeat a random MiB (generating 100 MB of random bytes costs ~1 s here).
  defp payload("bool", n), do: for(_ <- 1..n, into: <<>>, do: <<:rand.uniform(2) - 1>>)
  defp payload(_dtype, n) when n > @mb, do: :binary.copy(:rand.bytes(@mb), div(n, @mb))
  defp payload(_dtype, n), do: :rand.bytes(n)

  defp round_trip(dtype, nbytes) do
    bin = payload(dtype, nbytes)
    n = div(nbytes, Tensor.itemsize(dtype))
    {:ok, t} = Tensor.from_binary(bin, dtype, [n])
    assert {:ok, %Sidecar.Result{outputs: [out]}} = Sidecar.call(pool(), "identity", [t])
    assert %Tensor{dtype: ^dtype, shape: [^n], storage: {:data, back}, lease: nil} = out
    # Compare without printing 100 MB on failure.
    assert byte_size(back) == nbytes
    same? = back == bin
    assert same?, "#{dtype} #{nbytes} bytes differ after the round trip"
    :ok = Tensor.free(t)
    t
  end

  for {dtype, sizes} <- [
        {"float32", [@kb, 64 * @kb, @mb, 100 * @mb]},
        {"uint8", [@kb, @mb, 100 * @mb]},
        {"int64", [@kb, @mb]},
        {"float64", [@kb, @mb]},
        {"bfloat16", [@kb, @mb]},
        {"float16", [@mb]},
        {"bool", [@kb, 256 * @kb]}
      ],
      size <- sizes do
    test "#{dtype} #{div(size, @kb)} KiB round trip is byte-exact" do
      t = round_trip(unquote(dtype), unquote(size))
      # Above the inline threshold the input went through a VM segment, never inside the message.
      if unquote(size) >= 65_536, do: assert({:shm, %{name: "/sc-" <> _}} = t.storage)
    end
  end

  test "small tensors travel inline, large ones through a 0600 segment of the VM" do
    {:ok, small} = Tensor.from_binary(floats([1.0, 2.0]), :float32, [2])
    assert {:data, _} = small.storage
    {:ok, big} = Tensor.from_binary(:binary.copy(<<0>>, @mb), "uint8", [@mb])
    assert {:shm, %{name: name, offset: 0, nbytes: @mb, inode: inode}} = big.storage
    assert inode > 0
    [run, pid | _] = name |> String.trim_leading("/sc-") |> String.split("-")
    assert run == Sidecar.Shm.run_id() and pid == System.pid()
    stat = File.stat!(Sidecar.Shm.path(name))
    assert stat.inode == inode
    assert Bitwise.band(stat.mode, 0o777) == 0o600
    assert :ok = Tensor.free(big)
    refute File.exists?(Sidecar.Shm.path(name))
  end

  test "ops compute on the bytes (add, sum with attrs)" do
    a = Tensor.from_binary!(floats([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), "float32", [2, 3])
    {:ok, %{outputs: [sum]}} = Sidecar.call(pool(), "add", [a, a])
    assert to_floats(Tensor.to_binary!(sum)) == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    {:ok, %{outputs: [rows]}} = Sidecar.call(pool(), "sum", [a], attrs: [dim: 1])
    assert rows.shape == [2]
    assert to_floats(Tensor.to_binary!(rows)) == [6.0, 15.0]
  end

  test "read: false keeps the output in the worker's segment until it is released" do
    bin = :rand.bytes(4 * @mb)
    a = Tensor.from_binary!(bin, "float32", [@mb])
    {:ok, r} = Sidecar.call(pool(), "identity", [a], read: false)
    assert [%Tensor{storage: {:shm, %{name: name}}, lease: {_, _}} = out] = r.outputs
    assert r.leases != []
    # The worker's segment, not ours: its owner pid is the worker's.
    assert String.contains?(name, "-#{r.os_pid}-")
    assert Tensor.to_binary!(out) == bin
    assert :ok = Sidecar.release(r)
    Tensor.free(a)
  end

  test "out: the worker writes the result straight into a VM segment" do
    a = Tensor.from_binary!(floats(Enum.map(1..20_000, &(&1 * 1.0))), "float32", [20_000])
    {:ok, dst} = Tensor.empty("float32", [20_000])
    {:ok, %{outputs: [out]}} = Sidecar.call(pool(), "add", [a, a], out: [dst])
    assert out.storage == dst.storage
    assert to_floats(Tensor.to_binary!(dst)) == Enum.map(1..20_000, &(&1 * 2.0))
    Tensor.free(a)
    Tensor.free(dst)
  end

  test "a reused segment (write/2) serves the next call with the new bytes" do
    t = Tensor.from_binary!(:binary.copy(<<1>>, @mb), "uint8", [@mb])
    {:ok, %{outputs: [o1]}} = Sidecar.call(pool(), "identity", [t])
    :ok = Tensor.write(t, :binary.copy(<<2>>, @mb))
    {:ok, %{outputs: [o2]}} = Sidecar.call(pool(), "identity", [t])
    assert Tensor.to_binary!(o1) == :binary.copy(<<1>>, @mb)
    assert Tensor.to_binary!(o2) == :binary.copy(<<2>>, @mb)
    Tensor.free(t)
  end

  test "bad tensors are refused before anything is sent" do
    assert {:error, %Error{kind: :invalid_tensor_ref, field: "nbytes"}} =
             Tensor.from_binary(<<1, 2, 3>>, "float32", [1])

    assert {:error, %Error{kind: :invalid_tensor_ref, field: "dtype"}} =
             Tensor.from_binary(<<>>, "float8", [0])

    assert_raise Error, ~r/shape must be/, fn -> Tensor.from_binary!(<<>>, "uint8", [-1]) end
  end

  test "segments of a process that exits are unlinked" do
    parent = self()

    spawn(fn ->
      t = Tensor.from_binary!(:binary.copy(<<7>>, @mb), "uint8", [@mb])
      send(parent, {:made, t})
    end)

    assert_receive {:made, %Tensor{storage: {:shm, %{name: name}}}}
    # Sidecar.Shm unlinks on the owner's :DOWN, which no message to this test announces: poll the file.
    assert :ok = wait_until(fn -> not File.exists?(Sidecar.Shm.path(name)) end)
  end
end
