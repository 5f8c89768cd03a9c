! Network RAM from Fortran through Mosaic's C API (iso_c_binding): a real(8) array four times
! larger than the local RAM it may use, filled and summed against the closed form.
!   gfortran mosaic.f90 sum.f90 $(pkg-config --cflags --libs mosaic) -o sum && ./sum
program sum_netram
  use iso_c_binding
  use mosaic
  implicit none
  type(c_ptr) :: server, region
  type(mosaic_netram_options) :: o
  real(c_double), pointer :: a(:)
  integer(c_int64_t) :: n, i
  real(c_double) :: total, expected
  character(kind=c_char, len=31), target :: key = "fortran-example-key-0123456789" // c_null_char

  if (mosaic_init(c_loc(key)) /= MOSAIC_OK) stop 1
  if (mosaic_memserver_start("tcp://127.0.0.1:0" // c_null_char, 256_c_int64_t * 2**20, server) /= MOSAIC_OK) stop 2
  if (mosaic_netram_options_init(o) /= MOSAIC_OK) stop 3
  o%servers = mosaic_memserver_uri(server)
  o%size = 64_c_int64_t * 2**20
  o%resident_budget = 16_c_int64_t * 2**20
  if (mosaic_netram_create(o, region) /= MOSAIC_OK) stop 4
  n = mosaic_netram_size(region) / 8
  call c_f_pointer(mosaic_netram_ptr(region), a, [n])
  do i = 1, n
    a(i) = real(i, c_double)
  end do
  total = sum(a)
  expected = real(n, c_double) * real(n + 1, c_double) / 2
  print '(a, i0, a, es22.15, a, l1)', 'sum of 1..', n, ' = ', total, '  correct: ', total == expected
  if (mosaic_netram_destroy(region) /= MOSAIC_OK) stop 5
  if (mosaic_memserver_stop(server) /= MOSAIC_OK) stop 6
  if (mosaic_finalize() /= MOSAIC_OK) stop 7
  if (total /= expected) stop 8
end program
