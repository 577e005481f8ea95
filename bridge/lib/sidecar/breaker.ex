defmodule Sidecar.Breaker do
  @moduledoc """
  The pool's circuit breaker, a pure state machine (the pool's manager drives it; `now` is
  `System.monotonic_time(:millisecond)`), with the semantics of the Python pool's
  (`sidecar.host.breaker`):

    * `:closed` - crashes the work caused (`Sidecar.Exit.caused_by_work?/1`: a call's crash, a
      failed start; never an external kill) are counted in a sliding window; `threshold` of them
      within `window_ms` open it.
    * `:open` - for `cooldown_ms` no worker starts, and a call that finds no ready worker fails at
      once with `:circuit_open` instead of waiting. Ready workers keep serving: the breaker never
      stands between a healthy worker and a call.
    * `:half_open` - after the cool-down one worker start is the probe: ready closes the breaker
      (the window is cleared), a failure opens it again for another cool-down.
  """

  defstruct threshold: 5, window_ms: 30_000, cooldown_ms: 5_000, state: :closed, failures: [],
            opened_at: nil, probing: false, opened_count: 0

  @type state :: :closed | :open | :half_open
  @type t :: %__MODULE__{
          threshold: pos_integer,
          window_ms: pos_integer,
          cooldown_ms: non_neg_integer,
          state: state,
          failures: [integer],
          opened_at: integer | nil,
          probing: boolean,
          opened_count: non_neg_integer
        }

  @doc "A closed breaker (`threshold` >= 1, `window_ms` > 0, `cooldown_ms` >= 0)."
  @spec new(keyword) :: t
  def new(opts \\ []) do
    opts = Keyword.validate!(opts, threshold: 5, window_ms: 30_000, cooldown_ms: 5_000)

    unless is_integer(opts[:threshold]) and opts[:threshold] >= 1,
      do: raise(ArgumentError, "breaker threshold must be an integer >= 1, got #{inspect(opts[:threshold])}")

    unless is_integer(opts[:window_ms]) and opts[:window_ms] > 0,
      do: raise(ArgumentError, "breaker window_ms must be an integer > 0, got #{inspect(opts[:window_ms])}")

    unless is_integer(opts[:cooldown_ms]) and opts[:cooldown_ms] >= 0,
      do: raise(ArgumentError, "breaker cooldown_ms must be an integer >= 0, got #{inspect(opts[:cooldown_ms])}")

    struct(__MODULE__, opts)
  end

  @doc "Crashes counted within the window at `now`."
  @spec recent_failures(t, integer) :: non_neg_integer
  def recent_failures(b, now), do: length(trim(b.failures, b.window_ms, now))

  @doc "Counts a crash; `:opened` when this opened the breaker."
  @spec record_failure(t, integer) :: {t, :opened | nil}
  def record_failure(b, now) do
    b = %{b | failures: trim([now | b.failures], b.window_ms, now)}

    cond do
      b.state == :half_open -> {open(%{b | probing: false}, now), :opened}
      b.state == :closed and length(b.failures) >= b.threshold -> {open(b, now), :opened}
      true -> {b, nil}
    end
  end

  @doc "A probe (or any start while half-open) succeeded: `:closed` when this closed the breaker."
  @spec record_success(t) :: {t, :closed | nil}
  def record_success(%{state: :half_open} = b), do: {%{b | state: :closed, probing: false, failures: []}, :closed}
  def record_success(b), do: {b, nil}

  @doc "Open and cooled down: becomes half-open and returns true for the one caller that probes."
  @spec try_probe(t, integer) :: {t, boolean}
  def try_probe(%{state: :open} = b, now) do
    if now >= b.opened_at + b.cooldown_ms,
      do: {%{b | state: :half_open, probing: true}, true},
      else: {b, false}
  end

  def try_probe(b, _now), do: {b, false}

  @doc "Milliseconds until a probe may start (0 unless open)."
  @spec retry_after(t, integer) :: non_neg_integer
  def retry_after(%{state: :open} = b, now), do: max(0, b.opened_at + b.cooldown_ms - now)
  def retry_after(_b, _now), do: 0

  defp open(b, now), do: %{b | state: :open, opened_at: now, opened_count: b.opened_count + 1}

  defp trim(failures, window, now), do: Enum.filter(failures, &(&1 > now - window))
end
