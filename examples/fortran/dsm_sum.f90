! DSM from Fortran through Mosaic's C API (iso_c_binding): every node of the job adds its rank + 1
! to a shared integer(8) inside DSM lock 2, and to a second one, in a block allocated collectively,
! with the global atomic mosaic_dsm_fetch_add; after a barrier each checks both sums against the
! closed form n (n + 1) / 2.
!   gfortran dsm_sum.f90 $(pkg-config --cflags --libs mosaic) -o dsm_sum && mosrun -n 3 ./dsm_sum
!   (or: mpirun -x MOSAIC_CLUSTER_KEY -n 3 ./dsm_sum)
module mosaic_dsm
  use iso_c_binding
  implicit none
  integer(c_int), parameter :: MOSAIC_OK = 0
  interface
    ! NULL: the cluster key from MOSAIC_CLUSTER_KEY or MOSAIC_CLUSTER_KEY_FILE.
    integer(c_int) function mosaic_init(key) bind(c)
      import :: c_int, c_ptr
      type(c_ptr), value :: key
    end function
    integer(c_int) function mosaic_finalize() bind(c)
      import :: c_int
    end function
    type(c_ptr) function mosaic_last_error() bind(c)
      import :: c_ptr
    end function
    integer(c_int) function mosaic_dsm_join(size, out) bind(c)
      import :: c_int, c_int64_t, c_ptr
      integer(c_int64_t), value :: size
      type(c_ptr) :: out
    end function
    type(c_ptr) function mosaic_dsm_ptr(d) bind(c)
      import :: c_ptr
      type(c_ptr), value :: d
    end function
    integer(c_int) function mosaic_dsm_rank(d) bind(c)
      import :: c_int, c_ptr
      type(c_ptr), value :: d
    end function
    integer(c_int) function mosaic_dsm_nodes(d) bind(c)
      import :: c_int, c_ptr
      type(c_ptr), value :: d
    end function
    integer(c_int) function mosaic_dsm_barrier(d) bind(c)
      import :: c_int, c_ptr
      type(c_ptr), value :: d
    end function
    integer(c_int) function mosaic_dsm_lock(d, id) bind(c)
      import :: c_int, c_ptr, c_int64_t
      type(c_ptr), value :: d
      integer(c_int64_t), value :: id
    end function
    integer(c_int) function mosaic_dsm_unlock(d, id) bind(c)
      import :: c_int, c_ptr, c_int64_t
      type(c_ptr), value :: d
      integer(c_int64_t), value :: id
    end function
    ! Collective: every node calls it with the same size and gets the same address.
    integer(c_int) function mosaic_dsm_alloc(d, bytes, out) bind(c)
      import :: c_int, c_ptr, c_int64_t
      type(c_ptr), value :: d
      integer(c_int64_t), value :: bytes
      type(c_ptr) :: out
    end function
    integer(c_int) function mosaic_dsm_fetch_add(d, word, val, old) bind(c)
      import :: c_int, c_ptr, c_int64_t
      type(c_ptr), value :: d
      integer(c_int64_t) :: word
      integer(c_int64_t), value :: val
      integer(c_int64_t) :: old
    end function
    integer(c_int) function mosaic_dsm_leave(d) bind(c)
      import :: c_int, c_ptr
      type(c_ptr), value :: d
    end function
  end interface
end module

program dsm_sum
  use mosaic_dsm
  implicit none
  type(c_ptr) :: job, block
  integer(c_int64_t), pointer :: words(:), total, counted(:)
  integer(c_int64_t) :: old
  integer(c_int) :: rank, nodes
  integer(c_int64_t) :: expected
  logical :: correct

  if (mosaic_init(c_null_ptr) /= MOSAIC_OK) stop 'mosaic_init failed'
  if (mosaic_dsm_join(1048576_c_int64_t, job) /= MOSAIC_OK) stop 'mosaic_dsm_join failed'
  rank = mosaic_dsm_rank(job)
  nodes = mosaic_dsm_nodes(job)
  ! The region as 8-byte words; the shared integer is the first word of its third page.
  call c_f_pointer(mosaic_dsm_ptr(job), words, [131072])
  total => words(1025)
  if (mosaic_dsm_lock(job, 2_c_int64_t) /= MOSAIC_OK) stop 'mosaic_dsm_lock failed'
  total = total + rank + 1
  if (mosaic_dsm_unlock(job, 2_c_int64_t) /= MOSAIC_OK) stop 'mosaic_dsm_unlock failed'
  ! Two words from the collective heap (past the third page, which this program lays out itself:
  ! allocate a page's worth first so the block lands beyond it), added to atomically.
  if (mosaic_dsm_alloc(job, 16384_c_int64_t, block) /= MOSAIC_OK) stop 'mosaic_dsm_alloc failed'
  if (mosaic_dsm_alloc(job, 16_c_int64_t, block) /= MOSAIC_OK) stop 'mosaic_dsm_alloc failed'
  call c_f_pointer(block, counted, [2])
  if (mosaic_dsm_fetch_add(job, counted(2), int(rank + 1, c_int64_t), old) /= MOSAIC_OK) &
    stop 'mosaic_dsm_fetch_add failed'
  if (mosaic_dsm_barrier(job) /= MOSAIC_OK) stop 'mosaic_dsm_barrier failed'
  expected = int(nodes, c_int64_t) * (nodes + 1) / 2
  correct = total == expected .and. counted(2) == expected
  print '(a, i0, a, i0, a, i0, a, i0, a, i0, a, l1)', 'dsm_sum: node ', rank, ' of ', nodes, ': sum ', total, &
    ', atomic sum ', counted(2), ' (expected ', expected, ')  correct: ', correct
  ! The region is unmapped once the node leaves: nothing of it may be touched after.
  if (mosaic_dsm_leave(job) /= MOSAIC_OK) stop 'mosaic_dsm_leave failed'
  if (mosaic_finalize() /= MOSAIC_OK) stop 'mosaic_finalize failed'
  if (.not. correct) error stop 1
end program
