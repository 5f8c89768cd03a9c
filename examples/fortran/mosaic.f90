! Mosaic's C API for Fortran (iso_c_binding): the interfaces the examples use, in one module.
!   gfortran -c mosaic.f90   (then: use mosaic)
module mosaic
  use iso_c_binding
  implicit none
  integer(c_int), parameter :: MOSAIC_OK = 0
  type, bind(c) :: mosaic_netram_options
    integer(c_int64_t) :: size
    integer(c_int64_t) :: resident_budget
    type(c_ptr) :: servers
    integer(c_int32_t) :: copies
    integer(c_int32_t) :: fault_mode
    type(c_ptr) :: backing_file
    integer(c_int64_t) :: fixed_addr
  end type
  interface
    ! key: a NUL-terminated string (c_loc of a character variable), or c_null_ptr for the key
    ! from MOSAIC_CLUSTER_KEY or MOSAIC_CLUSTER_KEY_FILE.
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
    ! Network RAM and memory servers.
    integer(c_int) function mosaic_memserver_start(uri, capacity, out) bind(c)
      import :: c_int, c_char, c_int64_t, c_ptr
      character(kind=c_char), dimension(*) :: uri
      integer(c_int64_t), value :: capacity
      type(c_ptr) :: out
    end function
    type(c_ptr) function mosaic_memserver_uri(s) bind(c)
      import :: c_ptr
      type(c_ptr), value :: s
    end function
    integer(c_int) function mosaic_memserver_stop(s) bind(c)
      import :: c_int, c_ptr
      type(c_ptr), value :: s
    end function
    integer(c_int) function mosaic_netram_options_init(o) bind(c)
      import :: c_int, mosaic_netram_options
      type(mosaic_netram_options) :: o
    end function
    integer(c_int) function mosaic_netram_create(o, out) bind(c)
      import :: c_int, c_ptr, mosaic_netram_options
      type(mosaic_netram_options) :: o
      type(c_ptr) :: out
    end function
    type(c_ptr) function mosaic_netram_ptr(r) bind(c)
      import :: c_ptr
      type(c_ptr), value :: r
    end function
    integer(c_int64_t) function mosaic_netram_size(r) bind(c)
      import :: c_int64_t, c_ptr
      type(c_ptr), value :: r
    end function
    integer(c_int) function mosaic_netram_destroy(r) bind(c)
      import :: c_int, c_ptr
      type(c_ptr), value :: r
    end function
    ! DSM.
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
