#pragma once
/// @file intrusive_list.hpp
/// @brief A circular doubly-linked list whose links live inside the elements.

#include <cstddef>
#include <type_traits>

namespace kvortex::detail {

/// @brief The links an element embeds (by deriving from it) to sit in an `intrusive_list`.
struct list_hook {
  list_hook* prev{nullptr};
  list_hook* next{nullptr};

  [[nodiscard]] bool linked() const noexcept { return prev != nullptr; }
};

/// @brief A list of `T` (derived from `list_hook`) that never allocates; the caller owns the
/// elements and must keep them at a stable address while linked.
///
/// The front is the newest end, the back the oldest. Movable (the first and last elements are
/// re-pointed at the new sentinel), not copyable.
/// @tparam T element type, publicly derived from `list_hook`
template <class T>
class intrusive_list {
 public:
  intrusive_list() noexcept { reset(); }
  intrusive_list(const intrusive_list&) = delete;
  intrusive_list& operator=(const intrusive_list&) = delete;
  intrusive_list(intrusive_list&& o) noexcept { steal(o); }
  intrusive_list& operator=(intrusive_list&& o) noexcept {
    if (this != &o) steal(o);
    return *this;
  }
  ~intrusive_list() = default;

  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }

  /// @brief The oldest element, or null.
  [[nodiscard]] T* back() noexcept { return empty() ? nullptr : as_t(head_.prev); }
  /// @brief The newest element, or null.
  [[nodiscard]] T* front() noexcept { return empty() ? nullptr : as_t(head_.next); }
  /// @brief The element one step newer than `e`, or null when `e` is the front.
  [[nodiscard]] T* newer(T& e) noexcept {
    list_hook* n = static_cast<list_hook&>(e).prev;
    return n == &head_ ? nullptr : as_t(n);
  }

  void push_front(T& e) noexcept {
    list_hook& h = e;
    h.prev = &head_;
    h.next = head_.next;
    head_.next->prev = &h;
    head_.next = &h;
    ++size_;
  }

  void erase(T& e) noexcept {
    list_hook& h = e;
    h.prev->next = h.next;
    h.next->prev = h.prev;
    h.prev = h.next = nullptr;
    --size_;
  }

  void move_to_front(T& e) noexcept {
    erase(e);
    push_front(e);
  }

 private:
  static_assert(std::is_base_of_v<list_hook, T>, "intrusive_list<T> needs T derived from list_hook");

  static T* as_t(list_hook* h) noexcept { return static_cast<T*>(h); }

  void reset() noexcept {
    head_.prev = head_.next = &head_;
    size_ = 0;
  }

  void steal(intrusive_list& o) noexcept {
    if (o.empty()) {
      reset();
      return;
    }
    head_.next = o.head_.next;
    head_.prev = o.head_.prev;
    head_.next->prev = &head_;
    head_.prev->next = &head_;
    size_ = o.size_;
    o.reset();
  }

  list_hook head_;
  std::size_t size_{0};
};

}  // namespace kvortex::detail
