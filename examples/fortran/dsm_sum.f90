! DSM from Fortran through Mosaic's C API (iso_c_binding): every node of the job adds its rank + 1
! to a shared integer(8) inside DSM lock 2, and to a second one, in a block allocated collectively,
! with the global atomic mosaic_dsm_fetch_add; after a barrier each checks both sums against the
! closed form n (n + 1) / 2.
!   gfortran mosaic.f90 dsm_sum.f90 $(pkg-config --cflags --libs mosaic) -o dsm_sum && mosrun -n 3 ./dsm_sum
!   (or: mpirun -x MOSAIC_CLUSTER_KEY -n 3 ./dsm_sum)
program dsm_sum
  use iso_c_binding
  use mosaic
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
